//! What an event, `REQ` or `COUNT` must satisfy before it goes on the bus. Every refusal is
//! a `prefix: text` reason for `OK false` or `CLOSED`. Rate limits are in
//! [`crate::ratelimit`]; id and signature checks in the ingest workers.

use shared::event::{Event, Kind};
use shared::filter::Filter;

use crate::session::Session;

/// The NIP-42 kind, accepted only through `AUTH`.
pub const AUTH_KIND: Kind = Kind(22242);

/// Checks an event against the configured limits and policies (NIP-01 limits, NIP-13,
/// NIP-40, NIP-42 write policy, NIP-70 and reposts embedding protected events, NIP-86 bans
/// and allow lists, which a NIP-62 request to vanish addressed here passes).
pub fn check_event(session: &Session, event: &Event) -> Result<(), String> {
    let c = &session.state.config;
    let limits = &c.event_limits;
    if event.kind == AUTH_KIND {
        return Err("invalid: kind 22242 is for AUTH messages and is never published".into());
    }
    let relay_urls = session.state.relay_urls.as_ref();
    if let Some(reason) = session.state.moderation.get().refuses(event, relay_urls) {
        return Err(reason);
    }
    if event.tags.len() > limits.max_event_tags {
        return Err(format!(
            "invalid: {} tags; the limit is {}",
            event.tags.len(),
            limits.max_event_tags
        ));
    }
    let chars = event.content.chars().count();
    if chars > limits.max_content_length {
        return Err(format!(
            "invalid: content is {chars} characters; the limit is {}",
            limits.max_content_length
        ));
    }
    if event.replace_key().is_some_and(|d| d.contains('\0')) {
        return Err("invalid: the d tag must not contain NUL characters".into());
    }
    let now = shared::unix_now();
    if event.created_at > now + limits.created_at_upper_limit {
        return Err(format!(
            "invalid: created_at is more than {} seconds in the future",
            limits.created_at_upper_limit
        ));
    }
    if limits.created_at_lower_limit > 0 && event.created_at < now - limits.created_at_lower_limit {
        return Err(format!(
            "invalid: created_at is more than {} seconds in the past",
            limits.created_at_lower_limit
        ));
    }
    if event.is_expired(now) {
        return Err("invalid: event has expired".into());
    }
    let difficulty = event.pow_difficulty();
    if difficulty < limits.min_pow_difficulty {
        return Err(format!(
            "pow: difficulty {difficulty} is less than {}",
            limits.min_pow_difficulty
        ));
    }
    // NIP-62: a request to vanish is followed whoever sends it, authenticated or not.
    if c.auth.auth_write
        && session.authed.is_empty()
        && !shared::vanish::is_addressed_here(event, relay_urls)
    {
        return Err(
            "auth-required: this relay only accepts events from authenticated users".into(),
        );
    }
    if event.embeds_protected_event() {
        return Err("blocked: a repost must not embed a protected event (NIP-70)".into());
    }
    if event.is_protected() {
        if session.authed.is_empty() {
            return Err("auth-required: this event may only be published by its author".into());
        }
        if !session.authed.contains(&event.pubkey) {
            return Err("restricted: this event may only be published by its author".into());
        }
    }
    Ok(())
}

/// Checks a `REQ` or `COUNT`'s filters and clamps their limits to what the relay serves.
pub fn check_query(session: &Session, filters: &mut [Filter]) -> Result<(), String> {
    let c = &session.state.config;
    if filters.len() > c.limits.max_filters {
        return Err(format!(
            "invalid: {} filters; the limit is {}",
            filters.len(),
            c.limits.max_filters
        ));
    }
    c.query_limits.check(filters)?;
    if c.auth.auth_read && session.authed.is_empty() {
        return Err("auth-required: this relay only serves authenticated users".into());
    }
    let restricted = &session.state.restricted_kinds;
    let asks_only_restricted = |f: &Filter| {
        f.kinds
            .as_ref()
            .is_some_and(|ks| !ks.is_empty() && ks.iter().all(|k| restricted.contains(k)))
    };
    if session.authed.is_empty() && filters.iter().any(asks_only_restricted) {
        return Err(
            "auth-required: these kinds are only served to their author or recipients".into(),
        );
    }
    for f in filters.iter_mut() {
        if f.limit != Some(0) {
            f.limit = Some(c.query_limits.clamp(f.limit));
        }
    }
    Ok(())
}

/// Checks a subscription id against the configured maximum length (never above NIP-01's 64).
pub fn check_sub_id(session: &Session, sub_id: &shared::message::SubId) -> Result<(), String> {
    let max = session.state.config.limits.max_subid_length;
    let len = sub_id.as_str().chars().count();
    if len > max {
        return Err(format!(
            "invalid: subscription id is {len} characters; the limit is {max}"
        ));
    }
    Ok(())
}
