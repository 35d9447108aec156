//! Redis refusing one command of a round trip (here a key of the wrong type): a gateway
//! appends the entries gathered from many sessions in one pipelined round trip, and only
//! the events of the refused entry may be told that their append failed.

use relay_tests::Services;
use relay_tests::faults::unique_tag;

#[tokio::test]
async fn one_refused_append_fails_only_its_own_entry() {
    let services = Services::from_env();
    let client = redis::Client::open(services.redis_url.as_str()).expect("redis url");
    let mut conn = redis::aio::ConnectionManager::new(client)
        .await
        .expect("redis");
    let prefix = unique_tag("refusal");
    let good = format!("{prefix}:ingest:0");
    let bad = format!("{prefix}:ingest:1");
    let () = redis::cmd("SET")
        .arg(&bad)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .expect("set");

    let added = shared::bus::add_entries(
        &mut conn,
        &[
            (good.as_str(), b"[1]".as_slice()),
            (bad.as_str(), b"[2]".as_slice()),
            (good.as_str(), b"[3]".as_slice()),
        ],
    )
    .await
    .expect("the round trip itself succeeds");
    assert_eq!(added.len(), 3);
    assert!(added[0].is_ok(), "{:?}", added[0]);
    let refused = added[1].as_ref().expect_err("the string key refuses XADD");
    assert!(refused.to_string().contains("WRONGTYPE"), "{refused}");
    assert!(added[2].is_ok(), "{:?}", added[2]);
    let appended: usize = redis::cmd("XLEN")
        .arg(&good)
        .query_async(&mut conn)
        .await
        .expect("xlen");
    assert_eq!(appended, 2, "both entries around the refused one are there");

    let () = redis::cmd("DEL")
        .arg(&good)
        .arg(&bad)
        .query_async(&mut conn)
        .await
        .expect("del");
}
