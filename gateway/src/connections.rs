//! Open connections per client address ([`shared::address::address_key`]: IPv6 by /64), so
//! one client cannot take a gateway's whole `RELAY_MAX_CONNECTIONS` for itself.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use shared::address::address_key;

/// The count per address; a [`Slot`] holds one of them until dropped.
#[derive(Default)]
pub struct PerAddress {
    open: Mutex<HashMap<String, usize>>,
}

/// One open connection of an address; dropping it frees the place.
pub struct Slot {
    owner: Arc<PerAddress>,
    key: String,
}

impl PerAddress {
    /// Takes a place for a connection from `ip`, or `None` when `max` are open already.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Slot> {
        let key = address_key(ip);
        let mut open = self.lock();
        let n = open.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: Arc::clone(self),
            key,
        })
    }

    /// Connections open from `ip`'s address.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.lock().get(&address_key(ip)).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Plain counts: a panic elsewhere leaves nothing half-done in them.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.owner.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_at_most_max_places_back_when_dropped() {
        let per = Arc::new(PerAddress::default());
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let same_64: IpAddr = "2001:db8::ffff".parse().expect("ip");
        let other: IpAddr = "192.0.2.1".parse().expect("ip");
        let first = per.take(a, 2).expect("first");
        let _second = per.take(same_64, 2).expect("second");
        assert!(per.take(a, 2).is_none(), "the /64 is full");
        assert!(per.take(other, 2).is_some(), "others are not");
        drop(first);
        assert_eq!(per.open(a), 1);
        assert!(per.take(same_64, 2).is_some());
    }
}
