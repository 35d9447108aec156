//! `relay-admin`, the real binary, against real clusters.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use relay_tests::faults::{Nginx, local_tls_certificate, random_suffix, target_dir};
use relay_tests::{Cluster, bin_dir};
use serde_json::json;
use shared::event::signing::Keys;
use shared::event::{Event, Kind};
use tokio::process::Command;

use crate::{note, now};

/// Runs `relay-admin args…` against `cluster`, with `stdin` as its input.
async fn admin(cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> Output {
    let path = bin_dir().join("relay-admin");
    assert!(
        path.exists(),
        "{} is missing: build the workspace first",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.args(args)
        .env("RELAY_DATABASE_URL", &cluster.db_url)
        .env("RELAY_REDIS_URL", &cluster.services.redis_url)
        .env("RELAY_BUS_PREFIX", &cluster.prefix)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("relay-admin starts");
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt as _;
        let mut pipe = child.stdin.take().expect("stdin piped");
        pipe.write_all(input.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("relay-admin finishes within a minute")
        .expect("relay-admin runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The number after `name: ` on its own line of `text`.
fn count(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{name}:` line in:\n{text}"))
}

fn sorted_ids(events: &[Event]) -> Vec<String> {
    let mut ids: Vec<String> = events.iter().map(|e| e.id.to_hex()).collect();
    ids.sort();
    ids
}

/// Imports `events` into `cluster` through a temporary file; returns the summary.
async fn import(cluster: &Cluster, events: &[Event]) -> String {
    let lines: String = events.iter().map(|e| e.to_json() + "\n").collect();
    let out = admin(cluster, &["import"], Some(&lines)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

#[tokio::test]
async fn import_export_stats_delete() {
    let cluster = Cluster::default_cluster().await;
    let keys = Keys::generate();
    let t = now() - 100;
    let notes: Vec<Event> = (0..5)
        .map(|i| note(&keys, t + i, &format!("n{i}")))
        .collect();
    let profile = keys.sign(t, Kind(0), vec![], "{}");
    let mut tampered = note(&keys, t, "original");
    tampered.content = "tampered".into();

    let mut file = String::new();
    for e in &notes {
        file.push_str(&e.to_json());
        file.push('\n');
    }
    file.push_str(&profile.to_json());
    file.push('\n');
    file.push_str(&notes[0].to_json()); // line 7: duplicate
    file.push_str("\nnot json at all\n"); // line 8
    file.push_str(&tampered.to_json()); // line 9: id does not match
    file.push_str("\n\n");
    let dir = bin_dir().join("..").join("test-logs").join(&cluster.name);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("import.jsonl");
    std::fs::write(&path, &file).expect("write file");

    let out = admin(
        &cluster,
        &["import", path.to_str().expect("utf-8 path")],
        None,
    )
    .await;
    let (summary, errors) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{errors}");
    assert_eq!(count(&summary, "read"), 9, "{summary}");
    assert_eq!(count(&summary, "accepted"), 6, "{summary}");
    assert_eq!(count(&summary, "duplicate"), 1, "{summary}");
    assert_eq!(count(&summary, "rejected"), 2, "{summary}");
    assert_eq!(count(&summary, "  malformed"), 1, "{summary}");
    assert_eq!(count(&summary, "  bad id"), 1, "{summary}");
    assert!(errors.contains("line 8: malformed"), "{errors}");
    assert!(errors.contains("line 9: bad id"), "{errors}");

    // Served by REQ like published events.
    let mut c = cluster.client(0).await;
    let got = c
        .req("imported", &[json!({"authors": [keys.pubkey().to_hex()]})])
        .await;
    let mut expected = notes.clone();
    expected.push(profile.clone());
    assert_eq!(sorted_ids(&got), sorted_ids(&expected));

    // An older profile is superseded.
    let old_profile = keys.sign(t - 10, Kind(0), vec![], "{\"old\":1}");
    let summary = import(&cluster, &[old_profile]).await;
    assert_eq!(count(&summary, "superseded"), 1, "{summary}");

    // NIP-86 moderation holds for imports too: a banned author's event is refused.
    let banned = Keys::generate();
    let (db, conn) = tokio_postgres::connect(&cluster.db_url, tokio_postgres::NoTls)
        .await
        .expect("database");
    tokio::spawn(conn);
    db.execute(
        "INSERT INTO banned_pubkeys (pubkey, reason) VALUES ($1, 'spam')",
        &[&banned.pubkey().as_bytes().as_slice()],
    )
    .await
    .expect("ban");
    let summary = import(&cluster, &[note(&banned, t, "spam")]).await;
    assert_eq!(count(&summary, "  blocked"), 1, "{summary}");
    assert_eq!(count(&summary, "accepted"), 0, "{summary}");

    // Export with a filter, oldest first: exactly the notes, in order.
    let filter = json!({"kinds": [1], "authors": [keys.pubkey().to_hex()]}).to_string();
    let out = admin(&cluster, &["export", "--filter", &filter], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let exported: Vec<Event> = stdout(&out)
        .lines()
        .map(|l| Event::from_json(l).expect("exported line is an event"))
        .collect();
    assert_eq!(exported, notes);
    let out = admin(
        &cluster,
        &["export", "--filter", &filter, "--order", "desc"],
        None,
    )
    .await;
    let newest_first: Vec<Event> = stdout(&out)
        .lines()
        .filter_map(|l| Event::from_json(l).ok())
        .collect();
    assert_eq!(
        newest_first,
        notes.iter().rev().cloned().collect::<Vec<_>>()
    );

    // Stats count what is stored.
    let out = admin(&cluster, &["stats", "--json"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert_eq!(stats["total_events"], 6, "{stats}");
    assert!(
        stats["kinds"]
            .as_array()
            .expect("kinds")
            .contains(&json!({"kind": 1, "count": 5})),
        "{stats}"
    );
    assert!(stats["database_bytes"].as_i64().unwrap_or(0) > 0, "{stats}");
    assert!(stats["streams"].as_array().is_some(), "{stats}");
    let out = admin(&cluster, &["stats"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("total events   6"),
        "{}",
        stdout(&out)
    );

    // Delete: the empty filter is refused, a dry run counts, the real run deletes.
    let out = admin(&cluster, &["delete", "--filter", "{}"], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = admin(
        &cluster,
        &["delete", "--filter", &filter, "--dry-run"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(count(&stdout(&out), "would delete"), 5);
    let out = admin(&cluster, &["delete", "--filter", &filter], None).await;
    assert_eq!(count(&stdout(&out), "deleted"), 5, "{}", stderr(&out));
    let left = c
        .req(
            "after-delete",
            &[json!({"kinds": [1], "authors": [keys.pubkey().to_hex()]})],
        )
        .await;
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn sync_pulls_and_pushes_between_clusters() {
    let ours = Cluster::default_cluster().await;
    let theirs = Cluster::default_cluster().await;
    let keys = Keys::generate();
    let t = now() - 1000;
    // Theirs: 12 events, several in the same second, so REQ windows of 5 cut through ties.
    let their_events: Vec<Event> = (0..12)
        .map(|i| note(&keys, t + i / 3, &format!("theirs {i}")))
        .collect();
    import(&theirs, &their_events).await;
    // Both: one shared event; ours only: three.
    let shared_event = note(&keys, t + 50, "both");
    import(&theirs, std::slice::from_ref(&shared_event)).await;
    let our_events: Vec<Event> = (0..3)
        .map(|i| note(&keys, t + 100 + i, &format!("ours {i}")))
        .chain([shared_event.clone()])
        .collect();
    import(&ours, &our_events).await;

    let filter = json!({"authors": [keys.pubkey().to_hex()]}).to_string();
    let summary = sync(
        &ours,
        &theirs.url(),
        &filter,
        &["--direction", "pull", "--page", "5", "--no-negentropy"],
    )
    .await;
    assert!(summary.contains("method: REQ paging"), "{summary}");
    assert_eq!(count(&summary, "pull accepted"), 12, "{summary}");

    let mut c = ours.client(0).await;
    let mine = c
        .req(
            "after-pull",
            &[json!({"authors": [keys.pubkey().to_hex()]})],
        )
        .await;
    let mut all = their_events.clone();
    all.extend(our_events.iter().cloned());
    assert_eq!(sorted_ids(&mine), sorted_ids(&all));

    let summary = sync(&ours, &theirs.url(), &filter, &["--direction", "push"]).await;
    // Whatever the method, the three events only we had arrive there.
    assert_eq!(count(&summary, "push accepted"), 3, "{summary}");
    assert_eq!(count(&summary, "push rejected"), 0, "{summary}");
    let mut t2 = theirs.client(0).await;
    let there = t2
        .req(
            "after-push",
            &[json!({"authors": [keys.pubkey().to_hex()]})],
        )
        .await;
    assert_eq!(sorted_ids(&there), sorted_ids(&all));

    // Negentropy when our relay offers it: nothing is left to pull or push.
    let nips = supported_nips(&theirs).await;
    if nips.contains(&77) {
        let summary = sync(&ours, &theirs.url(), &filter, &["--direction", "both"]).await;
        assert!(summary.contains("method: negentropy"), "{summary}");
        assert_eq!(count(&summary, "pull accepted"), 0, "{summary}");
        assert_eq!(count(&summary, "push sent"), 0, "{summary}");
    }
}

/// Runs `relay-admin sync` from `ours` against `theirs` with `filter` and `extra`
/// arguments; asserts it succeeded and returns its summary (stdout).
async fn sync(ours: &Cluster, url: &str, filter: &str, extra: &[&str]) -> String {
    let mut args = vec!["sync", "--relay", url, "--filter", filter];
    args.extend_from_slice(extra);
    let out = admin(ours, &args, None).await;
    let summary = stdout(&out);
    assert!(out.status.success(), "{}\n{summary}", stderr(&out));
    summary
}

/// `relay-admin sync` with a relay behind TLS: nginx terminates `wss://` and `https://`
/// with a certificate a throwaway CA issued. Without `--ca-file` the certificate is refused
/// (before anything is read or written); with the CA's file the sync runs over `wss://`.
#[tokio::test]
async fn sync_over_wss_trusts_only_the_roots_it_is_given() {
    let ours = Cluster::default_cluster().await;
    let theirs = Cluster::default_cluster().await;
    let dir = target_dir().join("test-tls").join(random_suffix());
    let (ca, cert, key) = local_tls_certificate(&dir).expect("a certificate for 127.0.0.1");
    let tls = Nginx::start_tls(&[theirs.gateways[0].addr], &cert, &key)
        .await
        .expect("nginx terminates TLS");
    let url = tls.url();
    assert!(url.starts_with("wss://"), "{url}");

    let keys = Keys::generate();
    let events: Vec<Event> = (0..5)
        .map(|i| note(&keys, now() - 100 + i, &format!("over tls {i}")))
        .collect();
    import(&theirs, &events).await;
    let filter = json!({"authors": [keys.pubkey().to_hex()]}).to_string();

    let out = admin(
        &ours,
        &[
            "sync",
            "--relay",
            &url,
            "--filter",
            &filter,
            "--timeout",
            "5",
        ],
        None,
    )
    .await;
    eprintln!("[tls] without --ca-file: {}", stderr(&out).trim());
    assert!(
        !out.status.success(),
        "synced with an untrusted certificate"
    );
    assert!(
        stderr(&out).contains("certificate"),
        "the failure does not name the certificate: {}",
        stderr(&out)
    );

    let ca = ca.to_str().expect("a UTF-8 path");
    let summary = sync(&ours, &url, &filter, &["--ca-file", ca]).await;
    eprintln!("[tls] with --ca-file:\n{summary}");
    assert_eq!(count(&summary, "pull accepted"), 5, "{summary}");
    let mut c = ours.client(0).await;
    let mine = c
        .req("after-tls", &[json!({"authors": [keys.pubkey().to_hex()]})])
        .await;
    assert_eq!(sorted_ids(&mine), sorted_ids(&events));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay's NIP-11 `supported_nips`.
async fn supported_nips(cluster: &Cluster) -> Vec<u64> {
    let addr = cluster.gateways[0].addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream
        .write_all(
            format!("GET / HTTP/1.0\r\nHost: {addr}\r\nAccept: application/nostr+json\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("response");
    let text = String::from_utf8_lossy(&response);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("{}");
    let doc: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    doc["supported_nips"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn sync_with_a_silent_port_times_out() {
    let cluster = Cluster::default_cluster().await;
    // Accepts connections (the kernel does) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}", silent.local_addr().expect("addr"));
    let started = Instant::now();
    let out = admin(&cluster, &["sync", "--relay", &url, "--timeout", "2"], None).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        stderr(&out).contains("no answer within 2 s"),
        "{}",
        stderr(&out)
    );

    // Nothing listening at all: a plain failure, right away.
    let closed = relay_tests::free_port().expect("port");
    let out = admin(
        &cluster,
        &[
            "sync",
            "--relay",
            &format!("ws://{closed}"),
            "--timeout",
            "2",
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}
