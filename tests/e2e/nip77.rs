//! NIP-77 negentropy through the whole cluster: the client runs the initiator (the
//! `negentropy` crate), the query workers answer as the responder.

use std::collections::HashSet;
use std::time::Duration;

use negentropy::{Id, Negentropy, NegentropyStorageVector};
use relay_tests::{Client, Cluster, ClusterOptions};
use serde_json::{Value, json};
use shared::event::signing::Keys;
use shared::event::{Event, Kind};

use crate::{barrier, note, now};

/// The next `NEG-MSG` (`Ok(hex)`) or `NEG-ERR` (`Err(reason)`) for `sub`, skipping the rest.
async fn neg_answer(client: &mut Client, sub: &str) -> Result<String, String> {
    loop {
        let text = client.recv_text().await;
        let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let field = |i: usize| items.get(i).and_then(Value::as_str).unwrap_or_default();
        if field(1) != sub {
            continue;
        }
        match field(0) {
            "NEG-MSG" => return Ok(field(2).to_owned()),
            "NEG-ERR" => return Err(field(2).to_owned()),
            _ => {}
        }
    }
}

/// The next `NOTICE`, skipping the rest.
async fn notice(client: &mut Client) -> String {
    loop {
        let text = client.recv_text().await;
        if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&text)
            && items.first().and_then(Value::as_str) == Some("NOTICE")
        {
            return items[1].as_str().unwrap_or_default().to_owned();
        }
    }
}

/// The first message of an initiator holding `events`, hex-encoded.
fn initiator(events: &[Event]) -> Negentropy<'static, NegentropyStorageVector> {
    let mut storage = NegentropyStorageVector::new();
    for ev in events {
        let created_at = u64::try_from(ev.created_at).expect("positive timestamp");
        storage
            .insert(created_at, Id::from_byte_array(*ev.id.as_bytes()))
            .expect("insert");
    }
    storage.seal().expect("seal");
    Negentropy::owned(storage, 0).expect("initiator")
}

/// Reconciles `local` against the relay's events matching `filter`: the ids the client has
/// and the relay lacks ("have"), and those the relay has and the client lacks ("need").
async fn reconcile(
    client: &mut Client,
    sub: &str,
    filter: Value,
    local: &[Event],
) -> (HashSet<String>, HashSet<String>) {
    let mut neg = initiator(local);
    let first = neg.initiate().expect("initiate");
    client
        .send_json(json!(["NEG-OPEN", sub, filter, hex::encode(first)]))
        .await;
    let (mut have, mut need) = (Vec::new(), Vec::new());
    let mut rounds = 0;
    loop {
        let answer = neg_answer(client, sub).await.expect("NEG-MSG");
        let answer = hex::decode(answer).expect("hex from the relay");
        rounds += 1;
        assert!(rounds < 50, "reconciliation does not converge");
        match neg
            .reconcile_with_ids(&answer, &mut have, &mut need)
            .expect("a valid responder message")
        {
            Some(next) => {
                client
                    .send_json(json!(["NEG-MSG", sub, hex::encode(next)]))
                    .await
            }
            None => break,
        }
    }
    client.send_json(json!(["NEG-CLOSE", sub])).await;
    let hexes = |ids: Vec<Id>| ids.iter().map(|id| hex::encode(id.as_bytes())).collect();
    (hexes(have), hexes(need))
}

fn ids(events: &[Event]) -> HashSet<String> {
    events.iter().map(|e| e.id.to_hex()).collect()
}

fn notes(keys: &Keys, from: i64, n: usize, label: &str) -> Vec<Event> {
    (0..n)
        .map(|i| note(keys, from + i as i64, &format!("{label} {i}")))
        .collect()
}

#[tokio::test]
async fn nip77_client_and_relay_learn_what_each_lacks() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let alice = Keys::generate();
    let t = now() - 10_000;
    // Enough shared events that the relay splits ranges and the sync takes several rounds.
    let a = notes(&alice, t, 20, "only the client");
    let b = notes(&alice, t + 10, 300, "both");
    let c_only = notes(&alice, t + 15, 25, "only the relay");
    let relay: Vec<Event> = b.iter().chain(&c_only).cloned().collect();
    let acks = c.publish_all(&relay).await;
    assert!(acks.values().all(|a| a.accepted), "{acks:?}");

    let filter = json!({"authors": [alice.pubkey().to_hex()]});
    let local: Vec<Event> = a.iter().chain(&b).cloned().collect();
    let (have, need) = reconcile(&mut c, "sync", filter.clone(), &local).await;
    assert_eq!(have, ids(&a), "have = A");
    assert_eq!(need, ids(&c_only), "need = C");

    let acks = c.publish_all(&a).await;
    assert!(acks.values().all(|a| a.accepted), "{acks:?}");
    let wanted: Vec<String> = need.iter().cloned().collect();
    let got = c.req("fetch", &[json!({"ids": wanted})]).await;
    assert_eq!(ids(&got), ids(&c_only));

    let everything: Vec<Event> = local.into_iter().chain(got).collect();
    let (have, need) = reconcile(&mut c, "sync", filter, &everything).await;
    assert!(have.is_empty() && need.is_empty(), "{have:?} {need:?}");
}

#[tokio::test]
async fn nip77_filter_narrows_the_set_and_hides_restricted_kinds() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let alice = Keys::generate();
    let bob = Keys::generate();
    let t = now() - 100;
    let text = note(&alice, t, "a note");
    let reaction = alice.sign(t + 1, Kind(7), vec![], "+");
    let dm = alice.sign(
        t + 2,
        Kind(4),
        vec![vec!["p".into(), bob.pubkey().to_hex()]],
        "secret",
    );
    let acks = c
        .publish_all(&[text.clone(), reaction.clone(), dm.clone()])
        .await;
    assert!(acks.values().all(|a| a.accepted), "{acks:?}");
    let author = alice.pubkey().to_hex();

    let (have, need) =
        reconcile(&mut c, "k", json!({"authors": [author], "kinds": [7]}), &[]).await;
    assert!(have.is_empty());
    assert_eq!(need, ids(std::slice::from_ref(&reaction)), "only kind 7");

    let (_, need) = reconcile(&mut c, "anon", json!({"authors": [author]}), &[]).await;
    assert_eq!(
        need,
        ids(&[text.clone(), reaction.clone()]),
        "no DM without AUTH"
    );
    let (have, _) = reconcile(
        &mut c,
        "anon",
        json!({"authors": [author]}),
        std::slice::from_ref(&dm),
    )
    .await;
    assert_eq!(
        have,
        ids(std::slice::from_ref(&dm)),
        "the relay shows no DM"
    );

    assert!(c.auth(&bob).await.accepted);
    let (_, need) = reconcile(&mut c, "bob", json!({"authors": [author]}), &[]).await;
    assert_eq!(
        need,
        ids(&[text, reaction, dm]),
        "the recipient sees the DM"
    );
}

#[tokio::test]
async fn nip77_bad_messages_unknown_ids_and_session_limits() {
    let cluster = Cluster::start(ClusterOptions::with_env(&[("RELAY_MAX_NEG_SESSIONS", "2")]))
        .await
        .expect("cluster starts");
    let mut c = cluster.client(0).await;
    let empty = hex::encode(initiator(&[]).initiate().expect("initiate"));

    c.send_json(json!(["NEG-MSG", "nobody", empty])).await;
    let err = neg_answer(&mut c, "nobody").await.expect_err("unknown id");
    assert!(err.starts_with("closed: "), "{err}");

    let bad = [
        (json!(["NEG-OPEN", "h", {}, "zz"]), "invalid: "),
        (json!(["NEG-OPEN", "h", {}, "616"]), "invalid: "),
        (json!(["NEG-OPEN", "h", {}, ""]), "invalid: "),
        (json!(["NEG-OPEN", "h", {}, 61]), "invalid: "),
        (json!(["NEG-OPEN", "h", {"kinds": "x"}, empty]), "invalid: "),
        (json!(["NEG-OPEN", "h", {}]), "invalid: "),
        (json!(["NEG-MSG", "h", "xyz"]), "invalid: "),
        // Hex, but not a negentropy message: the worker refuses it.
        (json!(["NEG-OPEN", "h", {}, "00"]), "invalid: "),
    ];
    for (msg, prefix) in bad {
        c.send_json(msg.clone()).await;
        let err = neg_answer(&mut c, "h").await.expect_err("refused");
        assert!(err.starts_with(prefix), "{msg}: {err}");
    }
    // Another protocol version: the answer names the one the relay speaks (V1).
    c.send_json(json!(["NEG-OPEN", "v2", {}, "62"])).await;
    assert_eq!(neg_answer(&mut c, "v2").await.as_deref(), Ok("61"));
    c.send_json(json!(["NEG-CLOSE", "v2"])).await;
    for msg in [
        json!(["NEG-OPEN"]),
        json!(["NEG-CLOSE", 5]),
        json!(["NEG-MSG", ""]),
    ] {
        c.send_json(msg.clone()).await;
        let n = notice(&mut c).await;
        assert!(n.starts_with("invalid: "), "{msg}: {n}");
    }

    for sub in ["s1", "s2"] {
        c.send_json(json!(["NEG-OPEN", sub, {}, empty])).await;
        neg_answer(&mut c, sub).await.expect("opened");
    }
    c.send_json(json!(["NEG-OPEN", "s3", {}, empty])).await;
    let err = neg_answer(&mut c, "s3").await.expect_err("over the limit");
    assert!(err.starts_with("rate-limited: "), "{err}");
    // Replacing an open session is not one more.
    c.send_json(json!(["NEG-OPEN", "s1", {}, empty])).await;
    neg_answer(&mut c, "s1").await.expect("replaced");
    c.send_json(json!(["NEG-CLOSE", "s1"])).await;
    c.send_json(json!(["NEG-OPEN", "s3", {}, empty])).await;
    neg_answer(&mut c, "s3")
        .await
        .expect("room after NEG-CLOSE");
    c.send_json(json!(["NEG-MSG", "s1", empty])).await;
    let err = neg_answer(&mut c, "s1").await.expect_err("closed");
    assert!(err.starts_with("closed: "), "{err}");

    // NEG ids are not REQ ids: a REQ named like a NEG session is a subscription of its own.
    c.req("s2", &[json!({"ids": []})]).await;
    c.send_json(json!(["NEG-MSG", "s2", empty])).await;
    neg_answer(&mut c, "s2").await.expect("still open");
    barrier(&mut c).await;
}

#[tokio::test]
async fn nip77_idle_sessions_are_closed() {
    let cluster = Cluster::start(ClusterOptions::with_env(&[("RELAY_NEG_IDLE_SECS", "1")]))
        .await
        .expect("cluster starts");
    let mut c = cluster.client(0).await;
    let empty = hex::encode(initiator(&[]).initiate().expect("initiate"));
    c.send_json(json!(["NEG-OPEN", "idle", {}, empty])).await;
    neg_answer(&mut c, "idle").await.expect("opened");
    let started = std::time::Instant::now();
    let err = neg_answer(&mut c, "idle").await.expect_err("idle");
    assert!(err.starts_with("closed: "), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    c.send_json(json!(["NEG-MSG", "idle", empty])).await;
    let err = neg_answer(&mut c, "idle").await.expect_err("gone");
    assert!(err.starts_with("closed: "), "{err}");
    barrier(&mut c).await;
}
