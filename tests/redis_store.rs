//! The Redis store against real Redis: standalone, Sentinel and Cluster, through the
//! `Store` trait, with the stored form checked by a plain Redis client.

#[path = "support/redis.rs"]
#[allow(dead_code)]
mod redis_harness;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis_harness::{RedisCluster, RedisSentinel, RedisServer, SENTINEL_MASTER, wait_until};
use serde_json::{Value, json};
use session_proxy::session::id::{IdShape, SessionId};
use session_proxy::store::redis::{RedisOptions, RedisStore, Topology};
use session_proxy::store::{
    Landed, NewSession, PatchOutcome, Rotated, Store, StoreError, StoreSettings, unix_now,
};

const PREFIX: &str = "session:";
const MINUTE: Duration = Duration::from_secs(60);

fn settings(max_age: Duration) -> StoreSettings {
    StoreSettings {
        max_age,
        user_key: Some("user".into()),
        max_bytes: 4096,
    }
}

fn options(key_prefix: &str) -> RedisOptions {
    RedisOptions {
        key_prefix: key_prefix.into(),
        connect_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_secs(1),
        workers: 0,
    }
}

async fn connect(topology: Topology, max_age: Duration) -> RedisStore {
    RedisStore::connect(topology, options(PREFIX), settings(max_age))
        .await
        .expect("connect")
}

async fn standalone(server: &RedisServer, max_age: Duration) -> RedisStore {
    connect(Topology::Standalone { url: server.url() }, max_age).await
}

async fn clustered(cluster: &RedisCluster, max_age: Duration) -> RedisStore {
    let nodes = cluster.urls();
    connect(Topology::Cluster { nodes }, max_age).await
}

fn new_id() -> SessionId {
    SessionId::generate(IdShape::default())
}

fn key(id: &SessionId) -> String {
    format!("{PREFIX}{}", id.as_str())
}

fn session(json: &str) -> NewSession {
    NewSession {
        data: Bytes::copy_from_slice(json.as_bytes()),
        created: unix_now().as_secs(),
        ends: None,
    }
}

fn bytes(json: &str) -> Bytes {
    Bytes::copy_from_slice(json.as_bytes())
}

fn patch(json: &str) -> Value {
    serde_json::from_str(json).expect("patch JSON")
}

async fn data(store: &RedisStore, id: &SessionId) -> Option<String> {
    let record = store.load(id, false).await.expect("load")?;
    Some(String::from_utf8(record.data.to_vec()).expect("UTF-8"))
}

/// The handles of a user's listed sessions.
async fn handles_of(store: &RedisStore, user: &str) -> Vec<String> {
    let sessions = store.user_sessions(user).await.unwrap();
    sessions.into_iter().map(|s| s.handle).collect()
}

/// Polls `check` every 20 ms until it holds; panics after `limit`. Returns the time taken.
async fn eventually<F: Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> Duration {
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn unavailable<T: std::fmt::Debug>(result: Result<T, StoreError>) -> String {
    match result {
        Err(StoreError::Unavailable(why)) => why,
        other => panic!("expected StoreError::Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_created_read_replaced_and_deleted() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let id = new_id();
    assert_eq!(store.load(&id, false).await.unwrap(), None);
    store.create(&id, session(r#"{"a":1}"#)).await.unwrap();
    assert_eq!(data(&store, &id).await.as_deref(), Some(r#"{"a":1}"#));
    assert_eq!(
        store.replace(&id, bytes(r#"{"a":2}"#)).await.unwrap(),
        Landed::Done
    );
    assert_eq!(data(&store, &id).await.as_deref(), Some(r#"{"a":2}"#));
    store.delete(&id).await.unwrap();
    store.delete(&id).await.unwrap();
    assert_eq!(store.load(&id, false).await.unwrap(), None);
    assert_eq!(
        store.replace(&id, bytes(r#"{"a":3}"#)).await.unwrap(),
        Landed::Missing
    );
    assert_eq!(
        server.cli::<i64>(&["EXISTS", &key(&id)]),
        0,
        "replace must not recreate a deleted session"
    );
    store.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_is_one_readable_hash_under_the_key_prefix_with_its_ttl() {
    let server = RedisServer::start();
    let store = RedisStore::connect(
        Topology::Standalone { url: server.url() },
        options("app:sess:"),
        settings(MINUTE),
    )
    .await
    .unwrap();
    let id = new_id();
    let json = r#"{"user":"ann","cart":[1,2],"n":12345678901234567890123}"#;
    let now = unix_now().as_secs();
    let ends = now + 3600;
    store
        .create(
            &id,
            NewSession {
                data: bytes(json),
                created: now - 5,
                ends: Some(ends),
            },
        )
        .await
        .unwrap();

    let key = format!("app:sess:{}", id.as_str());
    let keys: Vec<String> = server.cli(&["KEYS", "app:sess:*"]);
    assert!(keys.contains(&key), "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("app:sess:")), "{keys:?}");
    assert_eq!(server.cli::<String>(&["TYPE", &key]), "hash");
    let fields: HashMap<String, String> = server.cli(&["HGETALL", &key]);
    assert_eq!(fields["data"], json);
    let _: Value = serde_json::from_str(&fields["data"]).expect("data is readable JSON");
    assert_eq!(fields["created"], (now - 5).to_string());
    assert_eq!(fields["ends"], ends.to_string());
    assert_eq!(fields["ver"], "1");
    assert_eq!(fields["user"], "ann");
    let seen: u64 = fields["seen"].parse().unwrap();
    assert!((now..=now + 2).contains(&seen));
    let pttl: i64 = server.cli(&["PTTL", &key]);
    assert!((55_000..=60_000).contains(&pttl), "TTL is max_age: {pttl}");

    // A replace bumps `ver` and keeps `user` in step with the data.
    for (n, (json, user)) in [
        (r#"{"user":"bob"}"#, Some("bob")),
        (r#"{"cart":[]}"#, None),
        (r#"{"user":"cy"}"#, Some("cy")),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(store.replace(&id, bytes(json)).await.unwrap(), Landed::Done);
        let fields: HashMap<String, String> = server.cli(&["HGETALL", &key]);
        assert_eq!(fields["data"], json);
        assert_eq!(fields["ver"], (n + 2).to_string());
        assert_eq!(fields.get("user").map(String::as_str), user, "{fields:?}");
        assert_eq!(fields["ends"], ends.to_string());
    }

    // A session without a user or an end has neither field.
    let plain = new_id();
    store.create(&plain, session(r#"{"a":1}"#)).await.unwrap();
    let fields: HashMap<String, String> =
        server.cli(&["HGETALL", &format!("app:sess:{}", plain.as_str())]);
    assert!(
        !fields.contains_key("user") && !fields.contains_key("ends"),
        "{fields:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_expire_after_max_age_in_real_time() {
    let server = RedisServer::start();
    let store = standalone(&server, Duration::from_secs(1)).await;
    let id = new_id();
    let start = Instant::now();
    store.create(&id, session(r#"{"a":1}"#)).await.unwrap();
    assert!(store.load(&id, false).await.unwrap().is_some());
    eventually("the session to expire", Duration::from_secs(5), || async {
        store.load(&id, false).await.unwrap().is_none()
    })
    .await;
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "expired early: {:?}",
        start.elapsed()
    );
    assert_eq!(server.cli::<i64>(&["EXISTS", &key(&id)]), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_resets_the_ttl_without_rewriting_the_data() {
    let server = RedisServer::start();
    let store = standalone(&server, Duration::from_secs(10)).await;
    let id = new_id();
    // What a round trip through Lua's cjson would have changed.
    let json = r#"{"big":12345678901234567890123,"empty":[],"f":0.1}"#;
    store.create(&id, session(json)).await.unwrap();
    let seen_before: u64 = server.cli(&["HGET", &key(&id), "seen"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A plain read leaves the TTL running down.
    assert!(store.load(&id, false).await.unwrap().is_some());
    let pttl: i64 = server.cli(&["PTTL", &key(&id)]);
    assert!(pttl < 8_700, "a read without renewal reset the TTL: {pttl}");

    let record = store.load(&id, true).await.unwrap().expect("session");
    assert_eq!(&record.data[..], json.as_bytes());
    let pttl: i64 = server.cli(&["PTTL", &key(&id)]);
    assert!(pttl > 9_500, "renewal did not reset the TTL: {pttl}");
    let stored: Vec<u8> = server.cli(&["HGET", &key(&id), "data"]);
    assert_eq!(stored, json.as_bytes(), "renewal changed the stored bytes");
    assert_eq!(
        server.cli::<String>(&["HGET", &key(&id), "ver"]),
        "1",
        "renewal rewrote the data"
    );
    let seen_after: u64 = server.cli(&["HGET", &key(&id), "seen"]);
    assert!(seen_after > seen_before, "renewal did not update `seen`");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_absolute_end_caps_every_ttl_and_an_ended_session_is_not_stored() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let id = new_id();
    let now = unix_now().as_secs();
    let ends = Some(now + 3);
    store
        .create(
            &id,
            NewSession {
                data: bytes(r#"{"a":1}"#),
                created: now,
                ends,
            },
        )
        .await
        .unwrap();
    let capped = |pttl: i64| (0..=3_000).contains(&pttl);
    assert!(capped(server.cli(&["PTTL", &key(&id)])));
    assert_eq!(
        store.replace(&id, bytes(r#"{"a":2}"#)).await.unwrap(),
        Landed::Done
    );
    assert!(capped(server.cli(&["PTTL", &key(&id)])));
    assert!(store.load(&id, true).await.unwrap().is_some());
    assert!(capped(server.cli(&["PTTL", &key(&id)])));
    let patched = store.patch(&id, &patch(r#"{"b":1}"#)).await.unwrap();
    assert!(matches!(patched, PatchOutcome::Updated(_)));
    assert!(capped(server.cli(&["PTTL", &key(&id)])));

    let ended = new_id();
    let past = NewSession {
        data: bytes(r#"{"a":1}"#),
        created: now - 10,
        ends: Some(now - 1),
    };
    store.create(&ended, past).await.unwrap();
    assert_eq!(server.cli::<i64>(&["EXISTS", &key(&ended)]), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_patch_merges_into_the_stored_session_keeping_numbers_and_arrays() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let id = new_id();
    store
        .create(
            &id,
            session(r#"{"a":1,"n":12345678901234567890123,"l":[],"o":{"x":1,"y":2}}"#),
        )
        .await
        .unwrap();
    let outcome = store
        .patch(&id, &patch(r#"{"a":null,"b":[],"o":{"y":null}}"#))
        .await
        .unwrap();
    let expected = r#"{"n":12345678901234567890123,"l":[],"o":{"x":1},"b":[]}"#;
    assert_eq!(outcome, PatchOutcome::Updated(bytes(expected)));
    assert_eq!(server.cli::<String>(&["HGET", &key(&id), "data"]), expected);
    assert_eq!(server.cli::<String>(&["HGET", &key(&id), "ver"]), "2");

    // Too large: refused, and the stored session stays as it was.
    let big = json!({ "big": "x".repeat(5000) });
    assert!(matches!(
        store.patch(&id, &big).await,
        Err(StoreError::TooLarge(_))
    ));
    assert_eq!(server.cli::<String>(&["HGET", &key(&id), "data"]), expected);

    // A patch that leaves `{}` destroys the session.
    let emptying = patch(r#"{"n":null,"l":null,"o":null,"b":null}"#);
    assert_eq!(
        store.patch(&id, &emptying).await.unwrap(),
        PatchOutcome::Destroyed
    );
    assert_eq!(server.cli::<i64>(&["EXISTS", &key(&id)]), 0);

    // No session: nothing is written.
    assert_eq!(
        store.patch(&id, &patch(r#"{"a":1}"#)).await.unwrap(),
        PatchOutcome::Missing
    );
    assert_eq!(server.cli::<i64>(&["EXISTS", &key(&id)]), 0);
}

/// Patches `count` keys of one session at once (`k0`: 0, `k1`: 1, …), each in a task of
/// its own, and gives their outcomes.
async fn patch_keys_at_once(
    store: &Arc<RedisStore>,
    id: &SessionId,
    count: usize,
) -> Vec<Result<PatchOutcome, StoreError>> {
    let patches = (0..count).map(|i| {
        let (store, id) = (store.clone(), id.clone());
        tokio::spawn(async move { store.patch(&id, &json!({ format!("k{i}"): i })).await })
    });
    futures_util::future::join_all(patches)
        .await
        .into_iter()
        .map(|joined| joined.expect("the patch task"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_patches_of_different_keys_all_land() {
    let server = RedisServer::start();
    let store = Arc::new(standalone(&server, MINUTE).await);
    let id = new_id();
    store
        .create(&id, session(r#"{"start":true}"#))
        .await
        .unwrap();
    for outcome in patch_keys_at_once(&store, &id, 50).await {
        assert!(matches!(outcome, Ok(PatchOutcome::Updated(_))));
    }
    let stored: Value = serde_json::from_str(&data(&store, &id).await.unwrap()).unwrap();
    for i in 0..50 {
        assert_eq!(
            stored[format!("k{i}")],
            json!(i),
            "patch {i} was lost: {stored}"
        );
    }
    assert_eq!(stored["start"], json!(true));
    assert_eq!(server.cli::<String>(&["HGET", &key(&id), "ver"]), "51");
}

/// Data someone else wrote under a session's key, not a JSON object, never reaches the
/// application as its session, and is not taken for no session either (which would
/// clear the cookie): the read fails.
#[tokio::test(flavor = "multi_thread")]
async fn stored_data_that_is_not_a_json_object_is_refused() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let id = new_id();
    store.create(&id, session(r#"{"a":1}"#)).await.unwrap();
    for junk in ["not json TOPSECRET", "[1,2]", "\"{}\"", ""] {
        let _: i64 = server.cli(&["HSET", &key(&id), "data", junk]);
        for renew in [false, true] {
            let why = unavailable(store.load(&id, renew).await);
            assert!(why.contains("not a JSON object"), "{junk:?}: {why}");
            assert!(!why.contains("TOPSECRET"), "{why}");
        }
    }
    let _: i64 = server.cli(&["HSET", &key(&id), "data", r#"{"b":2}"#]);
    let record = store.load(&id, false).await.unwrap().expect("the session");
    assert_eq!(&record.data[..], br#"{"b":2}"#);
}

/// Hundreds of patches of one session at once: every patch lands, none gives up (a 503
/// with Redis in good health), and the session keeps every key.
#[tokio::test(flavor = "multi_thread")]
async fn a_crowd_of_patches_of_one_session_all_land() {
    let server = RedisServer::start();
    let settings = StoreSettings {
        max_bytes: 64 * 1024,
        ..settings(MINUTE)
    };
    let topology = Topology::Standalone { url: server.url() };
    let store = RedisStore::connect(topology, options(PREFIX), settings)
        .await
        .expect("connect");
    let store = Arc::new(store);
    let id = new_id();
    store
        .create(&id, session(r#"{"start":true}"#))
        .await
        .unwrap();
    let failed: Vec<String> = patch_keys_at_once(&store, &id, 500)
        .await
        .into_iter()
        .filter_map(|o| match o {
            Ok(PatchOutcome::Updated(_)) => None,
            other => Some(format!("{other:?}")),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} patches failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let stored: Value = serde_json::from_str(&data(&store, &id).await.unwrap()).unwrap();
    for i in 0..500 {
        assert_eq!(stored[format!("k{i}")], json!(i), "patch {i} was lost");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_moves_the_session_and_the_old_id_lasts_only_the_grace_period() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let (old, new) = (new_id(), new_id());
    let now = unix_now().as_secs();
    let json = r#"{"user":"ann","role":"admin"}"#;
    let ends = now + 3600;
    store
        .create(
            &old,
            NewSession {
                data: bytes(json),
                created: now - 50,
                ends: Some(ends),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .rotate(&old, &new, Duration::from_secs(1))
            .await
            .unwrap(),
        Rotated::Done
    );
    // A second rotation of the same ID (a second login at once) moves nothing again.
    assert_eq!(
        store
            .rotate(&old, &new_id(), Duration::from_secs(1))
            .await
            .unwrap(),
        Rotated::Moved
    );

    let moved = store.load(&new, false).await.unwrap().expect("new ID");
    assert_eq!(
        (&moved.data[..], moved.created),
        (json.as_bytes(), now - 50)
    );
    let fields: HashMap<String, String> = server.cli(&["HGETALL", &key(&new)]);
    assert_eq!(fields["ends"], ends.to_string());
    assert_eq!(fields["user"], "ann");
    let handles = handles_of(&store, "ann").await;
    assert!(handles.contains(&new.handle()), "the new ID is indexed");

    // The old ID: still readable, but ends within the grace period.
    assert!(store.load(&old, false).await.unwrap().is_some());
    let pttl: i64 = server.cli(&["PTTL", &key(&old)]);
    assert!((0..=1_000).contains(&pttl), "old TTL not shortened: {pttl}");
    // In whole seconds, rounded up: the TTL keeps the exact end.
    let old_ends: u64 = server.cli(&["HGET", &key(&old), "ends"]);
    assert!(old_ends <= unix_now().as_secs() + 2);
    // Renewing the old ID cannot carry it past the grace period.
    assert!(store.load(&old, true).await.unwrap().is_some());
    let pttl: i64 = server.cli(&["PTTL", &key(&old)]);
    assert!(
        (0..=1_000).contains(&pttl),
        "renewal extended the old ID: {pttl}"
    );
    eventually(
        "the old ID to disappear",
        Duration::from_secs(5),
        || async { store.load(&old, false).await.unwrap().is_none() },
    )
    .await;
    assert!(store.load(&new, false).await.unwrap().is_some());

    let (gone, target) = (new_id(), new_id());
    assert_eq!(
        store
            .rotate(&gone, &target, Duration::from_secs(1))
            .await
            .unwrap(),
        Rotated::Missing
    );
    assert_eq!(server.cli::<i64>(&["EXISTS", &key(&target)]), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_away_id_lasts_its_whole_grace_period_and_no_longer() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let (old, new) = (new_id(), new_id());
    store.create(&old, session(r#"{"cart":1}"#)).await.unwrap();
    // Late in a second, so that the grace period ends late in the next one: a whole
    // second rounded down would end it 0.6-0.8 s early.
    while !(600..800).contains(&unix_now().subsec_millis()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rotated = Instant::now();
    let grace = Duration::from_secs(1);
    assert_eq!(
        store.rotate(&old, &new, grace).await.unwrap(),
        Rotated::Done
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Past the whole second, inside the grace period: a renewal and a write through the
    // old ID still find it.
    assert!(store.load(&old, true).await.unwrap().is_some(), "renewal");
    let write = store.replace(&old, bytes(r#"{"cart":2}"#));
    assert_eq!(write.await.unwrap(), Landed::Moved);
    assert!(rotated.elapsed() < grace, "checked within the grace period");
    // Neither carried it past the end of the grace period.
    let pttl: i64 = server.cli(&["PTTL", &key(&old)]);
    let left = grace.saturating_sub(rotated.elapsed());
    assert!(
        pttl > 0 && pttl <= left.as_millis() as i64 + 5,
        "TTL {pttl} ms with {left:?} of grace left"
    );
    tokio::time::sleep(left + Duration::from_millis(20)).await;
    assert!(
        store.load(&old, false).await.unwrap().is_none(),
        "past the end"
    );
    assert!(store.load(&new, false).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_away_id_lasts_its_grace_period_past_its_idle_timeout_not_its_end() {
    let server = RedisServer::start();
    // Rotated with less idle time left than the grace period.
    let store = standalone(&server, Duration::from_millis(400)).await;
    let (old, new) = (new_id(), new_id());
    store
        .create(&old, session(r#"{"user":"ann"}"#))
        .await
        .unwrap();
    let grace = Duration::from_millis(1_200);
    let rotated = Instant::now();
    assert_eq!(
        store.rotate(&old, &new, grace).await.unwrap(),
        Rotated::Done
    );
    // Renewals and writes through it meanwhile neither shorten nor lengthen it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(store.load(&old, true).await.unwrap().is_some());
    let write = store.replace(&old, bytes(r#"{"user":"ann","cart":2}"#));
    assert_eq!(write.await.unwrap(), Landed::Moved);
    // Its handle too, so that it can be revoked by handle until it ends.
    let handle: i64 = server.cli(&["PTTL", &format!("{PREFIX}handle:{}", old.handle())]);
    let left = grace.saturating_sub(rotated.elapsed()).as_millis() as i64;
    assert!(
        handle >= left - 50,
        "handle key: {handle} ms, grace left {left} ms"
    );
    // The session under the new ID is kept alive: the old ID ends with it.
    for _ in 0..2 {
        assert!(store.load(&new, true).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        store.load(&old, false).await.unwrap().is_some(),
        "within the grace"
    );
    // Still in the user's index, so that revoking the user's sessions finds it.
    assert!(handles_of(&store, "ann").await.contains(&old.handle()));
    tokio::time::sleep(grace.saturating_sub(rotated.elapsed()) + Duration::from_millis(20)).await;
    assert!(
        store.load(&old, false).await.unwrap().is_none(),
        "past the grace"
    );

    // A session whose absolute end comes first ends then, on both IDs.
    let store = standalone(&server, MINUTE).await;
    let (old, new) = (new_id(), new_id());
    let now = unix_now().as_secs();
    let ends = now + 1;
    let ending = NewSession {
        data: bytes(r#"{"cart":1}"#),
        created: now,
        ends: Some(ends),
    };
    store.create(&old, ending).await.unwrap();
    let long = Duration::from_secs(30);
    assert_eq!(store.rotate(&old, &new, long).await.unwrap(), Rotated::Done);
    let pttl: i64 = server.cli(&["PTTL", &key(&old)]);
    assert!((0..=1_000).contains(&pttl), "old TTL past the end: {pttl}");
    // Gone from the second of its end, on both IDs: the new one's TTL, copied from the
    // old one's, runs from when Redis got it, a moment late.
    while unix_now() < Duration::from_secs(ends) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(store.load(&old, false).await.unwrap().is_none());
    assert!(store.load(&new, false).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_user_index_lists_and_revokes_sessions_by_user_and_handle() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let (a, b, c) = (new_id(), new_id(), new_id());
    let created = unix_now().as_secs() - 7;
    let ann = NewSession {
        data: bytes(r#"{"user":"ann"}"#),
        created,
        ends: None,
    };
    store.create(&a, ann.clone()).await.unwrap();
    store.create(&b, ann).await.unwrap();
    store
        .create(&c, session(r#"{"user":"bob"}"#))
        .await
        .unwrap();

    let mut listed = store.user_sessions("ann").await.unwrap();
    listed.sort_by(|x, y| x.handle.cmp(&y.handle));
    let mut handles = vec![a.handle(), b.handle()];
    handles.sort();
    assert_eq!(
        listed.iter().map(|s| s.handle.clone()).collect::<Vec<_>>(),
        handles
    );
    assert!(listed.iter().all(|s| s.created == created));
    assert!(listed.iter().all(|s| s.last_seen >= created + 7));
    // The index and handle keys expire no later than a session could.
    let index_ttl: i64 = server.cli(&["PTTL", &format!("{PREFIX}user:ann")]);
    assert!((55_000..=60_000).contains(&index_ttl), "{index_ttl}");
    let handle_key = format!("{PREFIX}handle:{}", a.handle());
    assert_eq!(server.cli::<String>(&["GET", &handle_key]), "ann");
    assert!(server.cli::<i64>(&["PTTL", &handle_key]) > 55_000);

    assert!(store.revoke_handle(&b.handle()).await.unwrap());
    assert!(!store.revoke_handle(&b.handle()).await.unwrap());
    assert!(!store.revoke_handle("no-such-handle").await.unwrap());
    assert!(store.load(&b, false).await.unwrap().is_none());
    assert_eq!(store.revoke_user("ann").await.unwrap(), 1);
    assert!(store.load(&a, false).await.unwrap().is_none());
    assert!(store.user_sessions("ann").await.unwrap().is_empty());
    assert_eq!(
        server.cli::<i64>(&["EXISTS", &format!("{PREFIX}user:ann")]),
        0
    );
    assert!(
        store.load(&c, false).await.unwrap().is_some(),
        "bob's session survives"
    );

    // A session that changes hands is listed, and revoked, only under its current user.
    assert_eq!(
        store.replace(&c, bytes(r#"{"user":"ann"}"#)).await.unwrap(),
        Landed::Done
    );
    assert!(store.user_sessions("bob").await.unwrap().is_empty());
    assert_eq!(store.user_sessions("ann").await.unwrap().len(), 1);
    assert_eq!(store.revoke_user("bob").await.unwrap(), 0);
    assert!(store.load(&c, false).await.unwrap().is_some());
    assert!(store.revoke_handle(&c.handle()).await.unwrap());

    // Deleting a session takes it out of the index.
    let d = new_id();
    store
        .create(&d, session(r#"{"user":"cat"}"#))
        .await
        .unwrap();
    store.delete(&d).await.unwrap();
    let gone = |server: &RedisServer, id: &SessionId| {
        assert_eq!(
            server.cli::<i64>(&["EXISTS", &format!("{PREFIX}user:cat")]),
            0
        );
        assert_eq!(
            server.cli::<i64>(&["EXISTS", &format!("{PREFIX}handle:{}", id.handle())]),
            0
        );
    };
    gone(&server, &d);

    // A write or patch that finds the session gone leaves no index entry behind.
    assert_eq!(
        store.replace(&d, bytes(r#"{"user":"cat"}"#)).await.unwrap(),
        Landed::Missing
    );
    gone(&server, &d);
    let e = new_id();
    store
        .create(&e, session(r#"{"user":"cat"}"#))
        .await
        .unwrap();
    server.cli::<i64>(&["DEL", &key(&e)]);
    assert_eq!(
        store.replace(&e, bytes(r#"{"user":"cat"}"#)).await.unwrap(),
        Landed::Missing
    );
    gone(&server, &e);
}

/// A write indexes its session before it writes it: a listing that runs in between (the
/// session not there yet, or still another user's) must leave the entry, or the session
/// would stay out of its user's index, and out of reach of "log out everywhere".
#[tokio::test(flavor = "multi_thread")]
async fn listing_a_user_keeps_the_entries_of_sessions_still_being_written() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let index = format!("{PREFIX}user:ann");
    let later = (unix_now() + MINUTE).as_millis().to_string();
    // A session about to be created, and one about to pass from bob to ann.
    let (coming, moving) = (new_id(), new_id());
    store
        .create(&moving, session(r#"{"user":"bob"}"#))
        .await
        .unwrap();
    for id in [&coming, &moving] {
        server.cli::<i64>(&["ZADD", &index, &later, id.as_str()]);
    }
    assert!(store.user_sessions("ann").await.unwrap().is_empty());
    for id in [&coming, &moving] {
        let score: Option<f64> = server.cli(&["ZSCORE", &index, id.as_str()]);
        assert!(
            score.is_some(),
            "the listing dropped an entry still to be written"
        );
    }
    // The writes land: both are ann's, listed and revoked as such.
    store
        .create(&coming, session(r#"{"user":"ann"}"#))
        .await
        .unwrap();
    server.cli::<i64>(&["HSET", &key(&moving), "user", "ann"]);
    assert_eq!(store.user_sessions("ann").await.unwrap().len(), 2);
    assert_eq!(store.revoke_user("ann").await.unwrap(), 2);
}

/// The handle key names the user of the session's last indexing. Writes that change the
/// session's user, racing one another, may leave it naming the previous one: that user's
/// index keeps the entry (a listing skips it but does not drop it), so the handle still
/// reaches the session.
#[tokio::test(flavor = "multi_thread")]
async fn a_handle_reaches_its_session_whoever_its_user_became() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let id = new_id();
    store
        .create(&id, session(r#"{"user":"ann"}"#))
        .await
        .unwrap();
    for user in ["bob", "ann", "bob"] {
        let data = format!(r#"{{"user":"{user}"}}"#);
        assert_eq!(
            store.replace(&id, bytes(&data)).await.unwrap(),
            Landed::Done
        );
    }
    let handle_key = format!("{PREFIX}handle:{}", id.handle());
    assert_eq!(server.cli::<String>(&["GET", &handle_key]), "bob");
    // The handle key as racing writes can leave it: naming a user the session no longer
    // has. Listing that user (which used to drop the entry) leaves the handle working.
    server.cli::<String>(&["SET", &handle_key, "ann", "KEEPTTL"]);
    assert_eq!(store.user_sessions("bob").await.unwrap().len(), 1);
    assert!(store.user_sessions("ann").await.unwrap().is_empty());
    let revoked = store.revoke_handle(&id.handle()).await.unwrap();
    assert!(revoked, "the handle still reaches its session");
    assert!(store.load(&id, false).await.unwrap().is_none());

    let other = new_id();
    store
        .create(&other, session(r#"{"user":"cat"}"#))
        .await
        .unwrap();
    assert!(store.revoke_handle(&other.handle()).await.unwrap());
    assert!(store.load(&other, false).await.unwrap().is_none());
    assert!(!store.revoke_handle(&other.handle()).await.unwrap());
}

/// A session written while `user_key` was not set (or by a proxy without it) is in no
/// index: the first read (plain or renewing) with `user_key` set indexes it, so "log out
/// everywhere" reaches it; a session whose data names no user is left as it is.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_written_without_user_key_are_indexed_when_read() {
    let server = RedisServer::start();
    let unkeyed = RedisStore::connect(
        Topology::Standalone { url: server.url() },
        options(PREFIX),
        StoreSettings {
            user_key: None,
            ..settings(MINUTE)
        },
    )
    .await
    .unwrap();
    let store = standalone(&server, MINUTE).await;
    for renew in [false, true] {
        let user = format!("mig{renew}");
        let (id, anonymous) = (new_id(), new_id());
        let data = format!(r#"{{"cart":[1],"user":"{user}"}}"#);
        unkeyed.create(&id, session(&data)).await.unwrap();
        unkeyed
            .create(&anonymous, session(r#"{"cart":[2],"users":"no"}"#))
            .await
            .unwrap();
        assert!(store.user_sessions(&user).await.unwrap().is_empty());

        assert!(store.load(&id, renew).await.unwrap().is_some());
        assert!(store.load(&anonymous, renew).await.unwrap().is_some());
        assert_eq!(
            handles_of(&store, &user).await,
            vec![id.handle()],
            "{renew}"
        );
        assert_eq!(server.cli::<String>(&["HGET", &key(&id), "user"]), user);
        assert_index_ends_with_session(&server, &id, &user, "after the first read");
        let stray: Option<String> = server.cli(&["HGET", &key(&anonymous), "user"]);
        assert_eq!(stray, None, "a session naming no user got one");

        assert_eq!(store.revoke_user(&user).await.unwrap(), 1);
        assert!(store.load(&id, false).await.unwrap().is_none());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_user_index_forgets_expired_sessions() {
    let server = RedisServer::start();
    let store = standalone(&server, Duration::from_secs(1)).await;
    let id = new_id();
    store
        .create(&id, session(r#"{"user":"ann"}"#))
        .await
        .unwrap();
    assert_eq!(store.user_sessions("ann").await.unwrap().len(), 1);
    eventually(
        "the index to forget the expired session",
        Duration::from_secs(5),
        || async { store.user_sessions("ann").await.unwrap().is_empty() },
    )
    .await;
    assert_eq!(store.revoke_user("ann").await.unwrap(), 0);
    eventually(
        "the index keys to expire",
        Duration::from_secs(5),
        || async {
            let index: i64 = server.cli(&["EXISTS", &format!("{PREFIX}user:ann")]);
            let handle: i64 = server.cli(&["EXISTS", &format!("{PREFIX}handle:{}", id.handle())]);
            index + handle == 0
        },
    )
    .await;
}

/// How long, in ms, Redis keeps `key`: its PTTL, or the time left until its `score` in
/// the sorted set `key` when `member` is given. Negative once gone.
fn ms_left(server: &RedisServer, key: &str, member: Option<&str>) -> i64 {
    match member {
        None => server.cli(&["PTTL", key]),
        Some(member) => {
            let score: Option<f64> = server.cli(&["ZSCORE", key, member]);
            score.map_or(-2, |ms| ms as i64 - unix_now().as_millis() as i64)
        }
    }
}

/// Asserts that the index entries of `id` (under `user`) expire no later than the session.
fn assert_index_ends_with_session(server: &RedisServer, id: &SessionId, user: &str, when: &str) {
    let session = ms_left(server, &key(id), None);
    let handle = ms_left(server, &format!("{PREFIX}handle:{}", id.handle()), None);
    let entry = ms_left(server, &format!("{PREFIX}user:{user}"), Some(id.as_str()));
    assert!(session > 0, "{when}: the session is gone");
    // Some slack for the milliseconds between the commands that set each.
    for (what, left) in [("handle key", handle), ("user index entry", entry)] {
        assert!(
            (0..=session + 100).contains(&left),
            "{when}: the {what} expires in {left} ms, the session in {session} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn index_entries_expire_with_a_session_its_absolute_end_cuts_short() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let now = unix_now().as_secs();
    let ends = now + 3;
    let id = new_id();
    store
        .create(
            &id,
            NewSession {
                data: bytes(r#"{"user":"ann"}"#),
                created: now,
                ends: Some(ends),
            },
        )
        .await
        .unwrap();
    assert_index_ends_with_session(&server, &id, "ann", "after creation");
    assert_eq!(
        store
            .replace(&id, bytes(r#"{"user":"ann","a":1}"#))
            .await
            .unwrap(),
        Landed::Done
    );
    assert_index_ends_with_session(&server, &id, "ann", "after a replacement");
    assert!(store.load(&id, true).await.unwrap().is_some());
    assert_index_ends_with_session(&server, &id, "ann", "after a renewal");
    let patched = store.patch(&id, &patch(r#"{"b":2}"#)).await.unwrap();
    assert!(matches!(patched, PatchOutcome::Updated(_)), "{patched:?}");
    assert_index_ends_with_session(&server, &id, "ann", "after a patch");
    // Rotated with a grace period longer than what is left: the end still rules.
    let rotated = new_id();
    assert_eq!(
        store.rotate(&id, &rotated, MINUTE).await.unwrap(),
        Rotated::Done
    );
    assert_index_ends_with_session(&server, &rotated, "ann", "the new ID after rotation");
    assert_index_ends_with_session(&server, &id, "ann", "the old ID after rotation");

    eventually(
        "the sessions and every index key to expire",
        Duration::from_secs(6),
        || async {
            let keys: Vec<String> = server.cli(&["KEYS", &format!("{PREFIX}*")]);
            keys.is_empty()
        },
    )
    .await;
    assert!(unix_now().as_secs() >= ends, "expired before the end");
}

#[tokio::test(flavor = "multi_thread")]
async fn index_entries_of_a_rotated_away_id_expire_with_its_grace_period() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let grace = Duration::from_secs(1);
    let first = new_id();
    store
        .create(&first, session(r#"{"user":"ann"}"#))
        .await
        .unwrap();
    let mut ids = vec![first];
    for _ in 0..3 {
        let next = new_id();
        let last = ids.last().unwrap();
        assert_eq!(
            store.rotate(last, &next, grace).await.unwrap(),
            Rotated::Done
        );
        assert_index_ends_with_session(&server, last, "ann", "the old ID after rotation");
        assert_index_ends_with_session(&server, &next, "ann", "the new ID after rotation");
        ids.push(next);
    }
    let current = ids.pop().unwrap();

    let current_handle = format!("{PREFIX}handle:{}", current.handle());
    eventually(
        "the old IDs' handle keys to expire",
        Duration::from_secs(3),
        || {
            let keys: Vec<String> = server.cli(&["KEYS", &format!("{PREFIX}handle:*")]);
            let only_current = keys == [current_handle.as_str()];
            async move { only_current }
        },
    )
    .await;
    let live: Vec<String> = server.cli(&[
        "ZRANGE",
        &format!("{PREFIX}user:ann"),
        &unix_now().as_millis().to_string(),
        "+inf",
        "BYSCORE",
    ]);
    assert_eq!(
        live,
        [current.as_str()],
        "only the current ID's entry is unexpired"
    );
    let ttl: i64 = server.cli(&["PTTL", &format!("{PREFIX}user:ann")]);
    assert!(
        ttl > 55_000,
        "the index lives as long as the current ID: {ttl}"
    );
    for old in &ids {
        assert!(store.load(old, false).await.unwrap().is_none());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn operations_fail_as_unavailable_while_redis_is_down_and_recover_within_two_seconds() {
    let mut server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let id = new_id();
    let secret = r#"{"user":"ann","secret":"hunter2"}"#;
    store.create(&id, session(secret)).await.unwrap();
    server.stop();

    let errors = [
        unavailable(store.load(&id, false).await),
        unavailable(store.load(&id, true).await),
        unavailable(store.create(&new_id(), session(secret)).await),
        unavailable(store.replace(&id, bytes(secret)).await),
        unavailable(store.patch(&id, &patch(r#"{"a":1}"#)).await),
        unavailable(store.delete(&id).await),
        unavailable(store.rotate(&id, &new_id(), Duration::from_secs(1)).await),
        unavailable(store.user_sessions("ann").await),
        unavailable(store.revoke_user("ann").await),
        unavailable(store.revoke_handle(&id.handle()).await),
        unavailable(store.ping().await),
    ];
    for why in &errors {
        assert!(
            !why.contains(id.as_str()) && !why.contains("hunter2"),
            "leaks: {why}"
        );
    }
    eprintln!("while Redis is down: {}", errors[0]);

    server.restart();
    let recovered = eventually(
        "the store to answer again",
        Duration::from_secs(10),
        || async { store.ping().await.is_ok() },
    )
    .await;
    eprintln!("store answered again {recovered:?} after Redis came back");
    assert!(
        recovered < Duration::from_secs(2),
        "recovery took {recovered:?}"
    );
    // Redis came back empty: the old session is gone, new ones work.
    assert_eq!(store.load(&id, false).await.unwrap(), None);
    let fresh = new_id();
    store.create(&fresh, session(r#"{"a":1}"#)).await.unwrap();
    assert_eq!(data(&store, &fresh).await.as_deref(), Some(r#"{"a":1}"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_store_starts_while_redis_is_down_and_connects_once_it_is_up() {
    let mut server = RedisServer::start();
    server.stop();
    let store = standalone(&server, MINUTE).await;
    unavailable(store.ping().await);
    unavailable(store.load(&new_id(), false).await);
    server.restart();
    // The refusals while Redis was down do not linger: the first operation connects.
    store
        .ping()
        .await
        .expect("the first operation once Redis is up succeeds");
    assert_eq!(store.load(&new_id(), false).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_redis_closed_while_idle_costs_no_failed_operation() {
    let server = RedisServer::start();
    let store = standalone(&server, MINUTE).await;
    let id = new_id();
    store.create(&id, session(r#"{"a":1}"#)).await.unwrap();
    // Redis closes connections idle for a second (its `timeout` setting).
    server.cli::<()>(&["CONFIG", "SET", "timeout", "1"]);
    let others = || server.cli::<String>(&["CLIENT", "LIST"]).lines().count() - 1;
    eventually(
        "Redis to close the store's idle connection",
        Duration::from_secs(10),
        || {
            let n = others();
            async move { n == 0 }
        },
    )
    .await;
    assert_eq!(
        data(&store, &id).await.as_deref(),
        Some(r#"{"a":1}"#),
        "the first operation after the close succeeds"
    );
    server.cli::<()>(&["CONFIG", "SET", "timeout", "0"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_urls_are_refused_without_echoing_them() {
    for url in ["http://127.0.0.1:6379", "redis://user:s3cret@[bad", ""] {
        let result = RedisStore::connect(
            Topology::Standalone { url: url.into() },
            options(PREFIX),
            settings(MINUTE),
        )
        .await;
        let why = unavailable(result.map(|_| ()));
        assert!(
            why.contains("store.url") && !why.contains("s3cret"),
            "{why}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_the_server_lacks_is_named_in_the_error() {
    let server = RedisServer::start();
    let url = format!("{}/99", server.url());
    let store = connect(Topology::Standalone { url }, MINUTE).await;
    let why = unavailable(store.load(&new_id(), false).await);
    assert!(
        why.contains("DB index is out of range") && why.contains("databases"),
        "{why}"
    );
    assert_eq!(unavailable(store.ping().await), why);
}

/// The least-privilege ACL SECURITY.md gives is enough for every operation of the store,
/// the per-user index and late rotation markers included.
#[tokio::test(flavor = "multi_thread")]
async fn the_acl_security_md_gives_is_enough() {
    const ACL: &str = "resetkeys ~session:* resetchannels -@all \
        +@connection +ping +evalsha +eval +script|load +hget +hmget +hset +hdel +hincrby \
        +exists +get +set +del +pexpire +pexpireat +pexpiretime +pttl +zadd +zrem \
        +zrange +zremrangebyscore";
    let documented: String = include_str!("../SECURITY.md")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let acl_words: Vec<&str> = ACL.split_whitespace().collect();
    assert!(
        documented.contains(&acl_words.join(" ")),
        "SECURITY.md no longer gives this ACL"
    );
    let server = RedisServer::start();
    let mut args = vec!["ACL", "SETUSER", "session-proxy", "on", ">pw-0123456789"];
    args.extend(acl_words.iter().copied());
    server.cli::<()>(&args);
    let url = format!(
        "redis://session-proxy:pw-0123456789@127.0.0.1:{}",
        server.port()
    );
    let store = connect(Topology::Standalone { url }, MINUTE).await;
    store.ping().await.unwrap();
    let (a, b, c) = (new_id(), new_id(), new_id());
    store
        .create(&a, session(r#"{"user":"ann"}"#))
        .await
        .unwrap();
    assert!(store.load(&a, false).await.unwrap().is_some());
    assert!(store.load(&a, true).await.unwrap().is_some());
    assert_eq!(
        store
            .replace(&a, bytes(r#"{"user":"ann","n":1}"#))
            .await
            .unwrap(),
        Landed::Done
    );
    assert!(matches!(
        store.patch(&a, &patch(r#"{"n":2}"#)).await.unwrap(),
        PatchOutcome::Updated(_)
    ));
    assert_eq!(store.rotate(&a, &b, MINUTE).await.unwrap(), Rotated::Done);
    // No grace period: marked after it, by Redis's clock.
    assert_eq!(
        store.rotate(&b, &c, Duration::ZERO).await.unwrap(),
        Rotated::Done
    );
    let (moved, data): (Option<String>, Option<String>) =
        server.cli(&["HMGET", &key(&b), "moved", "data"]);
    assert_eq!(moved.as_deref(), Some(c.as_str()), "the old ID is marked");
    assert_eq!(data, None, "the old ID is unreadable");
    assert!(server.cli::<i64>(&["PTTL", &key(&b)]) <= 4_000);
    assert_eq!(store.user_sessions("ann").await.unwrap().len(), 2);
    assert!(store.revoke_handle(&c.handle()).await.unwrap());
    let d = new_id();
    store.create(&d, session(r#"{"user":"bo"}"#)).await.unwrap();
    assert_eq!(store.revoke_user("bo").await.unwrap(), 1);
    let e = new_id();
    store.create(&e, session("{}")).await.unwrap();
    assert_eq!(store.delete(&e).await.unwrap(), Landed::Done);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_without_access_to_the_key_prefix_is_told_to_check_its_acl() {
    let server = RedisServer::start();
    let password = "pw-s3cret";
    server.cli::<()>(&[
        "ACL",
        "SETUSER",
        "proxy",
        "on",
        &format!(">{password}"),
        "~other:*",
        "+@all",
    ]);
    let url = format!("redis://proxy:{password}@127.0.0.1:{}", server.port());
    let store = connect(Topology::Standalone { url }, MINUTE).await;
    // It may PING, but the store is not ready: it cannot touch its keys.
    let why = unavailable(store.ping().await);
    assert!(why.contains("NOPERM"), "{why}");
    let id = new_id();
    let errors = [
        unavailable(
            store
                .create(&id, session(r#"{"user":"ann","secret":"hunter2"}"#))
                .await,
        ),
        unavailable(store.load(&id, false).await),
        unavailable(store.load(&id, true).await),
    ];
    for why in &errors {
        assert!(
            why.contains("NOPERM") && why.contains("no permissions") && why.contains("ACL"),
            "{why}"
        );
        assert!(
            why.contains(&format!("~{PREFIX}*")),
            "names the keys: {why}"
        );
        assert!(
            !why.contains(password) && !why.contains(id.as_str()) && !why.contains("hunter2"),
            "leaks: {why}"
        );
    }

    // What the hint asks for is enough.
    server.cli::<()>(&[
        "ACL",
        "SETUSER",
        "proxy",
        "resetkeys",
        "-@all",
        &format!("~{PREFIX}*"),
        "+@read",
        "+@write",
        "+@scripting",
        "+ping",
    ]);
    store
        .create(&id, session(r#"{"user":"ann"}"#))
        .await
        .unwrap();
    assert!(store.load(&id, true).await.unwrap().is_some());
    let patched = store.patch(&id, &patch(r#"{"a":1}"#)).await.unwrap();
    assert!(matches!(patched, PatchOutcome::Updated(_)), "{patched:?}");
    let moved = new_id();
    assert_eq!(
        store.rotate(&id, &moved, MINUTE).await.unwrap(),
        Rotated::Done
    );
    assert_eq!(store.user_sessions("ann").await.unwrap().len(), 2);
    assert_eq!(store.revoke_user("ann").await.unwrap(), 2);
    store.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_an_untrusted_ca_is_named_in_the_error() {
    let server = RedisServer::start_tls();
    let store = connect(Topology::Standalone { url: server.url() }, MINUTE).await;
    let why = unavailable(store.load(&new_id(), false).await);
    assert!(
        why.contains("UnknownIssuer") && why.contains("CA") && why.contains("SSL_CERT_FILE"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_loses_no_acknowledged_write() {
    sentinel_failover_loses_no_acknowledged_write(1).await;
}

/// With two replicas, the one promoted may not be the one that confirmed a write: a write
/// counts as done only once every replica the Sentinels know as healthy holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_with_two_replicas_loses_no_acknowledged_write() {
    sentinel_failover_loses_no_acknowledged_write(2).await;
}

async fn sentinel_failover_loses_no_acknowledged_write(replicas: usize) {
    let setup = Arc::new(
        tokio::task::spawn_blocking(move || RedisSentinel::start_with(replicas))
            .await
            .unwrap(),
    );
    let topology = Topology::Sentinel {
        master: SENTINEL_MASTER.into(),
        nodes: setup.sentinel_urls(),
    };
    // Room for a patched session that gains a key with every write.
    let roomy = StoreSettings {
        max_bytes: 1 << 20,
        ..settings(MINUTE)
    };
    let store = Arc::new(
        RedisStore::connect(topology, options(PREFIX), roomy)
            .await
            .unwrap(),
    );
    let counter = new_id();
    store
        .create(&counter, session(r#"{"user":"ann"}"#))
        .await
        .unwrap();
    assert!(store.load(&counter, true).await.unwrap().is_some());
    assert_eq!(store.user_sessions("ann").await.unwrap().len(), 1);

    // Streams of writes: a new session each time, and a patch of one shared session.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            tokio::spawn({
                let (store, stop, counter) = (store.clone(), stop.clone(), counter.clone());
                async move {
                    let mut created = Vec::new();
                    let mut patched = Vec::new();
                    let mut failures = Vec::new();
                    let mut n = w * 1_000_000;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let id = new_id();
                        let json = format!(r#"{{"n":{n}}}"#);
                        match store.create(&id, session(&json)).await {
                            Ok(()) => created.push((id, json, Instant::now())),
                            Err(StoreError::Unavailable(_)) => failures.push(Instant::now()),
                            Err(e) => panic!("unexpected {e}"),
                        }
                        match store.patch(&counter, &json!({ format!("p{n}"): n })).await {
                            Ok(PatchOutcome::Updated(_)) => patched.push(n),
                            Ok(other) => panic!("patch: {other:?}"),
                            Err(StoreError::Unavailable(_)) => failures.push(Instant::now()),
                            Err(e) => panic!("unexpected {e}"),
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    (created, patched, failures)
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let old_master = setup.master_port();
    let started = Instant::now();
    let new_master = tokio::task::spawn_blocking({
        let setup = setup.clone();
        move || setup.failover()
    })
    .await
    .unwrap();
    let switched = started.elapsed();
    assert_ne!(new_master, old_master);
    // Keep writing until writes have gone through for a while after the switch (a replica
    // re-pointed at the new master needs a full sync first).
    tokio::time::sleep(Duration::from_secs(3 * replicas as u64)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut created, mut patched, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    for writer in writers {
        let (c, p, f) = writer.await.unwrap();
        created.extend(c);
        patched.extend(p);
        failures.extend(f);
    }
    failures.sort();

    let resumed = created
        .iter()
        .map(|(_, _, at)| *at)
        .find(|at| failures.last().is_none_or(|last| at > last));
    let after_switch = created
        .iter()
        .filter(|(_, _, at)| *at > started + switched)
        .count();
    assert!(after_switch > 0, "no write succeeded after the failover");

    // Every acknowledged write is on the new master.
    let master = setup.server(new_master);
    let lost_creates = created
        .iter()
        .filter(|(id, json, _)| {
            master
                .try_cli::<Option<String>>(&["HGET", &key(id), "data"])
                .ok()
                .flatten()
                .as_deref()
                != Some(json.as_str())
        })
        .count();
    let stored: Value =
        serde_json::from_str(&master.cli::<String>(&["HGET", &key(&counter), "data"])).unwrap();
    let lost_patches = patched
        .iter()
        .filter(|n| stored[format!("p{n}")] != json!(n))
        .count();
    let outage = match (failures.first(), resumed) {
        (Some(first), Some(resumed)) => resumed.duration_since(*first),
        _ => Duration::ZERO,
    };
    eprintln!(
        "sentinel failover: Sentinels switched {switched:?} after SENTINEL FAILOVER; \
         writes failed for {outage:?}; {} creates and {} patches acknowledged, \
         {} refused as unavailable, {lost_creates} creates and {lost_patches} patches lost",
        created.len(),
        patched.len(),
        failures.len()
    );
    assert_eq!((lost_creates, lost_patches), (0, 0));
    assert!(
        outage < Duration::from_secs(10),
        "writes failed for {outage:?}"
    );
    // And the store keeps working on the new master.
    let id = new_id();
    store
        .create(&id, session(r#"{"after":true}"#))
        .await
        .unwrap();
    assert!(master.cli::<i64>(&["EXISTS", &key(&id)]) == 1);
}

/// A master with one replica and three Sentinels, and a store that finds it through them.
async fn sentinel_with_store() -> (RedisSentinel, RedisStore) {
    let setup = tokio::task::spawn_blocking(RedisSentinel::start)
        .await
        .unwrap();
    let topology = Topology::Sentinel {
        master: SENTINEL_MASTER.into(),
        nodes: setup.sentinel_urls(),
    };
    let store = connect(topology, MINUTE).await;
    (setup, store)
}

/// A master whose replica died: once the Sentinels mark the replica down, writes go
/// through without waiting for it, steadily (not held up each time what the Sentinels
/// said is asked again).
#[tokio::test(flavor = "multi_thread")]
async fn writes_go_on_steadily_once_the_sentinels_mark_the_only_replica_down() {
    let (mut setup, store) = sentinel_with_store().await;
    store.create(&new_id(), session("{}")).await.unwrap();
    setup.crash_replicas();
    let crashed = Instant::now();
    let mut late = Vec::new();
    while crashed.elapsed() < Duration::from_secs(6) {
        let started = Instant::now();
        let written = store.create(&new_id(), session(r#"{"a":1}"#)).await;
        // The Sentinels take `down-after-milliseconds` (1 s) to see the replica gone,
        // and what they said holds a second: from 2.5 s on, every write goes through.
        if crashed.elapsed() > Duration::from_millis(2500)
            && (written.is_err() || started.elapsed() > Duration::from_millis(300))
        {
            late.push((crashed.elapsed(), started.elapsed(), written.is_ok()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(late.is_empty(), "writes held up or refused: {late:?}");
}

/// A Sentinel alone with the master (the others out of reach, as across a partition) may
/// see no replica while the others promote one: without a majority of the Sentinels to
/// say the master is alone, a write needs a replica, however many writes arrive at once,
/// even right after the Sentinels had all agreed that the master was alone.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_majority_of_sentinels_a_write_still_needs_a_replica() {
    let (mut setup, store) = sentinel_with_store().await;
    setup.crash_replicas();
    // The Sentinels mark the replica down: the master takes writes alone.
    eventually(
        "writes to go through without the replica",
        Duration::from_secs(10),
        || async { store.create(&new_id(), session("{}")).await.is_ok() },
    )
    .await;
    setup.crash_sentinels(2);
    let crashed = Instant::now();
    let store = Arc::new(store);
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut taken = 0;
                while crashed.elapsed() < Duration::from_secs(3) {
                    let started = crashed.elapsed();
                    let written = store.create(&new_id(), session(r#"{"a":1}"#)).await;
                    // What the Sentinels said before holds a second at most.
                    if written.is_ok() && started > Duration::from_millis(1500) {
                        taken += 1;
                    }
                }
                taken
            })
        })
        .collect();
    let mut taken = 0;
    for writer in writers {
        taken += writer.await.unwrap();
    }
    assert_eq!(
        taken, 0,
        "writes taken without a replica or a majority of Sentinels"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_resume_when_a_crashed_master_leaves_a_promoted_replica_on_its_own() {
    let (mut setup, store) = sentinel_with_store().await;
    let before = new_id();
    store.create(&before, session(r#"{"a":1}"#)).await.unwrap();

    let crashed = Instant::now();
    let (setup, new_master) = tokio::task::spawn_blocking(move || {
        let port = setup.crash_master();
        (setup, port)
    })
    .await
    .unwrap();
    let promoted = crashed.elapsed();
    // The new master has no replica to confirm writes: they are taken anyway, since
    // nothing could be promoted over it.
    let after = new_id();
    let resumed = eventually(
        "writes to succeed again",
        Duration::from_secs(10),
        || async { store.create(&after, session(r#"{"b":2}"#)).await.is_ok() },
    )
    .await;
    eprintln!(
        "master crashed: replica promoted after {promoted:?}, writes resumed {resumed:?} later"
    );
    let master = setup.server(new_master);
    assert_eq!(
        master.cli::<String>(&["HGET", &key(&after), "data"]),
        r#"{"b":2}"#
    );
    // The write acknowledged before the crash was confirmed by the replica, so it survived.
    assert_eq!(data(&store, &before).await.as_deref(), Some(r#"{"a":1}"#));
    for i in 0..20 {
        store
            .create(&new_id(), session(&format!(r#"{{"i":{i}}}"#)))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_spreads_sessions_over_its_nodes_and_every_operation_works() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let store = clustered(&cluster, MINUTE).await;
    store.ping().await.unwrap();

    let ids: Vec<SessionId> = (0..30).map(|_| new_id()).collect();
    for (i, id) in ids.iter().enumerate() {
        let json = if i % 3 == 0 {
            r#"{"user":"ann"}"#.to_string()
        } else {
            format!(r#"{{"i":{i}}}"#)
        };
        store.create(id, session(&json)).await.unwrap();
    }
    let sizes: Vec<i64> = cluster.nodes().iter().map(|n| n.cli(&["DBSIZE"])).collect();
    assert!(
        sizes.iter().all(|&n| n > 0),
        "sessions not spread over the nodes: {sizes:?}"
    );
    let slots: std::collections::HashSet<i64> = ids
        .iter()
        .map(|id| cluster.cli(&["CLUSTER", "KEYSLOT", &key(id)]))
        .collect();
    assert!(slots.len() > 1);

    for (i, id) in ids.iter().enumerate() {
        assert!(store.load(id, i % 2 == 0).await.unwrap().is_some());
    }
    assert_eq!(
        store
            .replace(&ids[1], bytes(r#"{"i":"replaced"}"#))
            .await
            .unwrap(),
        Landed::Done
    );
    assert_eq!(
        cluster.cli::<String>(&["HGET", &key(&ids[1]), "data"]),
        r#"{"i":"replaced"}"#
    );
    let patched = store.patch(&ids[2], &patch(r#"{"j":2}"#)).await.unwrap();
    assert_eq!(patched, PatchOutcome::Updated(bytes(r#"{"i":2,"j":2}"#)));
    assert_eq!(
        store.patch(&ids[4], &patch(r#"{"i":null}"#)).await.unwrap(),
        PatchOutcome::Destroyed
    );
    let rotated = new_id();
    assert_eq!(
        store
            .rotate(&ids[5], &rotated, Duration::from_secs(1))
            .await
            .unwrap(),
        Rotated::Done
    );
    assert_eq!(data(&store, &rotated).await.as_deref(), Some(r#"{"i":5}"#));
    store.delete(&ids[7]).await.unwrap();
    assert!(store.load(&ids[7], false).await.unwrap().is_none());

    let ann: Vec<&SessionId> = ids.iter().step_by(3).collect();
    assert_eq!(store.user_sessions("ann").await.unwrap().len(), ann.len());
    assert!(store.revoke_handle(&ann[0].handle()).await.unwrap());
    assert_eq!(store.revoke_user("ann").await.unwrap(), ann.len() - 1);
    for id in ann {
        assert!(store.load(id, false).await.unwrap().is_none());
    }
    assert!(store.load(&ids[8], false).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_that_lost_a_master_fails_the_ping_until_it_is_back() {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let store = clustered(&cluster, MINUTE).await;
    store.ping().await.unwrap();

    // The other nodes declare the master failed after cluster-node-timeout (5 s); from then
    // on every node answers CLUSTERDOWN to key commands, and PING as before.
    cluster.nodes_mut()[0].stop();
    let cluster = tokio::task::spawn_blocking(move || {
        wait_until("cluster_state:fail", Duration::from_secs(30), || {
            cluster.nodes()[1..].iter().all(|n| {
                n.try_cli::<String>(&["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:fail"))
            })
        });
        cluster
    })
    .await
    .unwrap();
    assert_eq!(cluster.nodes()[1].cli::<String>(&["PING"]), "PONG");
    let why = unavailable(store.ping().await);
    assert!(
        why.contains("cluster_state:fail") && why.contains("CLUSTERDOWN"),
        "{why}"
    );
    let started = Instant::now();
    let why = unavailable(store.load(&new_id(), false).await);
    eprintln!(
        "a session read while the cluster is down failed after {:?}: {why}",
        started.elapsed()
    );
    assert!(why.contains("CLUSTERDOWN"), "{why}");

    let mut cluster = cluster;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.nodes_mut()[0].restart();
        cluster
    })
    .await
    .unwrap();
    eventually(
        "the ping to succeed again",
        Duration::from_secs(30),
        || async { store.ping().await.is_ok() },
    )
    .await;
    let id = new_id();
    store.create(&id, session(r#"{"a":1}"#)).await.unwrap();
    assert!(store.load(&id, false).await.unwrap().is_some());
    drop(cluster);
}

/// A Cluster of three masters with a replica each (a node is declared failed after
/// 1 s), a store on it, a session stored there, and the index of the session's master.
async fn replicated_cluster_with_a_session(
    json: &str,
    node_timeout_ms: u64,
) -> (RedisCluster, RedisStore, SessionId, usize) {
    let cluster = tokio::task::spawn_blocking(move || RedisCluster::start_with(1, node_timeout_ms))
        .await
        .unwrap();
    let store = clustered(&cluster, MINUTE).await;
    // On a busy machine the first write may find the just-formed cluster slow to answer
    // (`CLUSTER NODES`, the replica's acknowledgement), which is a 503 by design: it is
    // tried again, under a new ID (the failed one may have been written).
    let mut id = new_id();
    let started = Instant::now();
    while let Err(e) = store.create(&id, session(json)).await {
        eprintln!("first write to the new cluster: {e}");
        assert!(started.elapsed() < Duration::from_secs(20), "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        id = new_id();
    }
    let master = cluster.master_of(&key(&id));
    (cluster, store, id, master)
}

/// A Cluster master that stops answering without closing its connections (a paused
/// machine, a network partition): once its replica has taken over, the sessions in its
/// slots are read and written again while it is still paused. The cluster client alone
/// kept sending them to the silent master until it woke.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_follows_a_failover_away_from_a_master_that_stopped_answering() {
    let (cluster, store, id, master) = replicated_cluster_with_a_session(r#"{"a":1}"#, 1000).await;
    let copies: i64 = cluster.nodes()[master].cli(&["WAIT", "1", "5000"]);
    assert_eq!(copies, 1, "the replica holds the session");

    cluster.nodes()[master].pause();
    let took = eventually(
        "the session to be read from the promoted replica",
        Duration::from_secs(40),
        || async { matches!(store.load(&id, false).await, Ok(Some(_))) },
    )
    .await;
    eprintln!("sessions of the paused master's slots were served again after {took:?}");
    assert!(
        cluster.nodes()[master]
            .try_cli::<String>(&["PING"])
            .is_err(),
        "the old master is still paused"
    );
    // Every slot is served: new sessions, wherever they land, are stored and read back.
    for _ in 0..16 {
        let id = new_id();
        store.create(&id, session(r#"{"b":2}"#)).await.unwrap();
        assert!(store.load(&id, false).await.unwrap().is_some());
    }
    cluster.nodes()[master].resume();
}

/// Under Cluster, a write is acknowledged only once the replica of its master holds it:
/// with the replica paused, a write fails (503) rather than be acknowledged by a master
/// whose failure would lose it; once the cluster has marked the replica failed, writes
/// go on without it.
///
/// A write that its replicas do not confirm asks the cluster again, and goes through if
/// the replica is flagged by then: the node timeout (4 s) is far longer than the wait
/// for confirmation (0.5 s), so that the first write cannot meet a flag already set.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_write_waits_for_the_replica_of_its_master() {
    let (cluster, store, id, master) = replicated_cluster_with_a_session(r#"{"n":0}"#, 4000).await;
    let replica = cluster.replica_of(master);

    cluster.nodes()[replica].pause();
    let started = Instant::now();
    let why = unavailable(store.replace(&id, Bytes::from_static(br#"{"n":1}"#)).await);
    assert!(why.contains("replica"), "{why}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // The cluster marks the replica failed after cluster-node-timeout: from then on
    // its master has no replica to wait for.
    let took = eventually(
        "writes to go on once the replica is marked failed",
        Duration::from_secs(30),
        || async {
            store
                .replace(&id, Bytes::from_static(br#"{"n":2}"#))
                .await
                .is_ok()
        },
    )
    .await;
    eprintln!("writes went on {took:?} after the replica stopped");
    let record = store.load(&id, false).await.unwrap().expect("the session");
    assert_eq!(&record.data[..], br#"{"n":2}"#);
    cluster.nodes()[replica].resume();
}

/// "Log out everywhere" while a session of the user is being rotated: neither the old ID
/// nor the new one may survive it, whichever way the two interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_racing_a_revocation_leaves_no_session_of_the_user() {
    let server = RedisServer::start();
    let store = Arc::new(standalone(&server, MINUTE).await);
    for round in 0..40 {
        let (old, new) = (new_id(), new_id());
        store
            .create(&old, session(r#"{"user":"ann"}"#))
            .await
            .unwrap();
        let rotating = {
            let (store, old, new) = (store.clone(), old.clone(), new.clone());
            tokio::spawn(async move { store.rotate(&old, &new, MINUTE).await.unwrap() })
        };
        let revoking = {
            let store = store.clone();
            tokio::spawn(async move { store.revoke_user("ann").await.unwrap() })
        };
        let (rotated, _) = (rotating.await.unwrap(), revoking.await.unwrap());
        for (which, id) in [("old", &old), ("new", &new)] {
            assert!(
                store.load(id, false).await.unwrap().is_none(),
                "round {round}: the {which} ID survived (rotation: {rotated:?})"
            );
        }
    }
}

/// Sessions created while the user's sessions are being revoked: each one that lives on
/// is still in the user's index, so that the next revocation ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_created_during_a_revocation_stay_indexed() {
    let server = RedisServer::start();
    let store = Arc::new(standalone(&server, MINUTE).await);
    let mut created = Vec::new();
    for _ in 0..60 {
        let ids: Vec<SessionId> = (0..10).map(|_| new_id()).collect();
        let creating = ids.iter().cloned().map(|id| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create(&id, session(r#"{"user":"ann"}"#))
                    .await
                    .unwrap()
            })
        });
        let creating: Vec<_> = creating.collect();
        tokio::task::yield_now().await;
        store.revoke_user("ann").await.unwrap();
        for task in creating {
            task.await.unwrap();
        }
        created.extend(ids);
    }
    let listed = handles_of(&store, "ann").await;
    for id in &created {
        if store.load(id, false).await.unwrap().is_some() {
            assert!(
                listed.contains(&id.handle()),
                "a live session is not indexed"
            );
        }
    }
    store.revoke_user("ann").await.unwrap();
    for id in &created {
        assert!(store.load(id, false).await.unwrap().is_none());
    }
}

/// Two rotations of one ID at the same time (a double-clicked login): one moves the
/// session, the other finds it moved, never two live copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_rotations_of_one_id_at_once_move_it_once() {
    let server = RedisServer::start();
    let store = Arc::new(standalone(&server, MINUTE).await);
    for round in 0..50 {
        let old = new_id();
        store
            .create(&old, session(r#"{"user":"ann"}"#))
            .await
            .unwrap();
        let rotate = || {
            let (store, old, new) = (store.clone(), old.clone(), new_id());
            tokio::spawn(async move { store.rotate(&old, &new, MINUTE).await.unwrap() })
        };
        let (a, b) = (rotate(), rotate());
        let mut results = [a.await.unwrap(), b.await.unwrap()];
        results.sort_by_key(|r| *r != Rotated::Done);
        assert_eq!(results, [Rotated::Done, Rotated::Moved], "round {round}");
    }
}

/// A patch that lands on the old ID while it is being rotated is either carried to the
/// new ID or reported as landing on the old copy (so that its answer does not hand the
/// old cookie back): never reported done and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patch_racing_a_rotation_is_carried_over_or_reported_moved() {
    let server = RedisServer::start();
    let store = Arc::new(standalone(&server, MINUTE).await);
    for round in 0..100 {
        let (old, new) = (new_id(), new_id());
        store.create(&old, session(r#"{"a":1}"#)).await.unwrap();
        let rotating = {
            let (store, old, new) = (store.clone(), old.clone(), new.clone());
            tokio::spawn(async move { store.rotate(&old, &new, MINUTE).await.unwrap() })
        };
        let patching = {
            let (store, old) = (store.clone(), old.clone());
            tokio::spawn(async move { store.patch(&old, &patch(r#"{"b":2}"#)).await.unwrap() })
        };
        let (rotated, patched) = (rotating.await.unwrap(), patching.await.unwrap());
        assert_eq!(rotated, Rotated::Done, "round {round}");
        match patched {
            PatchOutcome::Updated(_) => {
                let copied = data(&store, &new).await.unwrap();
                assert!(copied.contains(r#""b":2"#), "round {round}: lost: {copied}");
            }
            PatchOutcome::Moved(_) => {}
            other => panic!("round {round}: {other:?}"),
        }
    }
}

// A rotation whose marking of the old ID (the `SHORTEN` script) goes wrong on the way.

/// What the relay does with the reply to the first command that carries `MARKER`.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Holds the reply past the store's response timeout.
    Delay,
    /// Closes the client's connection instead of passing the reply on.
    Drop,
    /// Never passes the command on (it does not run; the store times out).
    Hold,
    /// Passes the reply on, then lets nothing through for two seconds.
    CutAfter,
    /// Passes the command on this many ms late, as a Redis that stalled would run it; the
    /// reply then comes after the store's response timeout (1 s).
    Late(u64),
}

/// Runs a rotation, so that Redis has the store's scripts cached and the next `SHORTEN`
/// is one `EVALSHA` that runs.
async fn warm_scripts(store: &RedisStore) {
    let (a, b) = (new_id(), new_id());
    store.create(&a, session(r#"{"user":"bo"}"#)).await.unwrap();
    assert_eq!(store.rotate(&a, &b, MINUTE).await.unwrap(), Rotated::Done);
}

/// `millis(grace)` for a grace period of 4321 s, as RESP sends it: only SHORTEN carries it.
const MARKER: &[u8] = b"$7\r\n4321000\r\n";

/// The same for a grace period of 1234 ms.
const SHORT_MARKER: &[u8] = b"$4\r\n1234\r\n";

/// A TCP relay in front of Redis that, once armed, lets the first command carrying
/// `MARKER` reach Redis and run, then loses its reply (`fault`).
async fn faulty_relay(redis_port: u16, fault: Fault, armed: Arc<AtomicBool>) -> u16 {
    relay_on(redis_port, fault, armed, MARKER).await
}

/// `faulty_relay` for the first command carrying `marker`.
async fn relay_on(
    redis_port: u16,
    fault: Fault,
    armed: Arc<AtomicBool>,
    marker: &'static [u8],
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let down = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            if down.load(Ordering::SeqCst) {
                continue;
            }
            let server = tokio::net::TcpStream::connect(("127.0.0.1", redis_port))
                .await
                .unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let swallow = Arc::new(AtomicBool::new(false));
            let (armed, swallow2) = (armed.clone(), swallow.clone());
            let (down_in, down_out) = (down.clone(), down.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if down_in.load(Ordering::SeqCst) {
                        return;
                    }
                    if buf[..n].windows(marker.len()).any(|w| w == marker)
                        && armed.swap(false, Ordering::SeqCst)
                    {
                        match fault {
                            Fault::Hold => continue,
                            Fault::Late(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                            _ => swallow2.store(true, Ordering::SeqCst),
                        }
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if swallow.swap(false, Ordering::SeqCst) {
                        match fault {
                            Fault::Delay => tokio::time::sleep(Duration::from_millis(1500)).await,
                            Fault::Drop => {
                                let _ = cw.shutdown().await;
                                return;
                            }
                            Fault::Hold | Fault::Late(_) => {}
                            Fault::CutAfter => {
                                let _ = cw.write_all(&buf[..n]).await;
                                down_out.store(true, Ordering::SeqCst);
                                let down = down_out.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_secs(2)).await;
                                    down.store(false, Ordering::SeqCst);
                                });
                                let _ = cw.shutdown().await;
                                return;
                            }
                        }
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Rotates a session through a relay that loses the marking of the old ID (`fault`), and
/// checks that the rotation happened whole or not at all: done, with the old ID moved to
/// a copy that is there; or not done, with the session under the old ID, unmarked (the
/// proxy then keeps the browser's cookie, which must go on working).
async fn rotation_with_lost_shorten_reply(fault: Fault) {
    let server = RedisServer::start();
    let armed = Arc::new(AtomicBool::new(false));
    let port = faulty_relay(server.port(), fault, armed.clone()).await;
    let store = connect(
        Topology::Standalone {
            url: format!("redis://127.0.0.1:{port}"),
        },
        MINUTE,
    )
    .await;
    warm_scripts(&store).await;

    let (old, new) = (new_id(), new_id());
    store
        .create(&old, session(r#"{"user":"ann","cart":1}"#))
        .await
        .unwrap();
    armed.store(true, Ordering::SeqCst);
    let rotated = store.rotate(&old, &new, Duration::from_secs(4321)).await;
    let old_moved = server
        .cli::<Option<String>>(&["HGET", &key(&old), "moved"])
        .is_some();
    let new_exists = server.cli::<i64>(&["EXISTS", &key(&new)]) == 1;
    match rotated {
        Ok(Rotated::Done) => {
            assert!(old_moved && new_exists, "new ID exists: {new_exists}");
            // The old ID and its index entry end together, however late the marking ran.
            let ends: i64 = server.cli(&["PEXPIRETIME", &key(&old)]);
            let user = format!("{PREFIX}user:ann");
            let indexed: f64 = server.cli(&["ZSCORE", &user, old.as_str()]);
            assert!(
                (indexed as i64 - ends).abs() <= 5,
                "old ID ends at {ends}, its index entry at {indexed}"
            );
        }
        _ => {
            assert!(
                !old_moved,
                "rotation reported {rotated:?} (the proxy keeps the old cookie), yet the old \
                 ID was marked moved and ends with its grace period; new ID exists: {new_exists}"
            );
            let kept: String = server.cli(&["HGET", &key(&old), "data"]);
            assert_eq!(kept, r#"{"user":"ann","cart":1}"#);
        }
    }
}

/// Redis goes away right after the old ID was marked: its index entries already last as
/// long as its grace period, so that revoking the user's sessions still finds it.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_id_stays_indexed_for_its_grace_period_when_redis_goes_away_after_marking_it() {
    let server = RedisServer::start();
    let armed = Arc::new(AtomicBool::new(false));
    let port = faulty_relay(server.port(), Fault::CutAfter, armed.clone()).await;
    // Less idle time than the grace period: the marking gives the old ID longer.
    let url = format!("redis://127.0.0.1:{port}");
    let store = connect(Topology::Standalone { url }, Duration::from_secs(1)).await;
    warm_scripts(&store).await;
    let (old, new) = (new_id(), new_id());
    store
        .create(&old, session(r#"{"user":"ann"}"#))
        .await
        .unwrap();
    armed.store(true, Ordering::SeqCst);
    let grace = Duration::from_secs(4321);
    assert_eq!(
        store.rotate(&old, &new, grace).await.unwrap(),
        Rotated::Done
    );
    let pttl: i64 = server.cli(&["PTTL", &key(&old)]);
    assert!(
        pttl > 4_000_000,
        "the old ID lasts its grace period: {pttl}"
    );
    let expires: f64 = server.cli(&["ZSCORE", &format!("{PREFIX}user:ann"), old.as_str()]);
    let in_grace = (unix_now() + Duration::from_secs(4_000)).as_millis() as f64;
    assert!(expires > in_grace, "indexed until {expires}");
    let handle_ttl: i64 = server.cli(&["PTTL", &format!("{PREFIX}handle:{}", old.handle())]);
    assert!(handle_ttl > 4_000_000, "handle key: {handle_ttl}");
}

/// The old ID was marked, but the answer came after the response timeout: the rotation
/// happened, and is reported so (else the browser would stay on an ID that is ending).
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_whose_answer_is_late_is_done_when_it_ran() {
    rotation_with_lost_shorten_reply(Fault::Delay).await;
}

/// The old ID was marked, the connection dropped before the answer and the script was
/// sent again: the second run finds the ID moved to this same copy, which stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_sent_again_after_a_dropped_answer_keeps_its_copy() {
    rotation_with_lost_shorten_reply(Fault::Drop).await;
}

/// Redis stalls past the grace period with the marking queued: marked that late, the old
/// ID is left unreadable (no data, no user, out of the index) rather than deleted, so that
/// the marking sent again finds it moved to this copy, which stays: the session is not
/// lost, and the old ID ends on time.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_marked_after_its_grace_period_is_done_and_the_old_id_unreadable() {
    let server = RedisServer::start();
    let armed = Arc::new(AtomicBool::new(false));
    let port = relay_on(
        server.port(),
        Fault::Late(1500),
        armed.clone(),
        SHORT_MARKER,
    )
    .await;
    let url = format!("redis://127.0.0.1:{port}");
    let store = connect(Topology::Standalone { url }, MINUTE).await;
    warm_scripts(&store).await;
    let (old, new) = (new_id(), new_id());
    store
        .create(&old, session(r#"{"user":"ann","cart":1}"#))
        .await
        .unwrap();
    armed.store(true, Ordering::SeqCst);
    let grace = Duration::from_millis(1234);
    assert_eq!(
        store.rotate(&old, &new, grace).await.unwrap(),
        Rotated::Done
    );
    assert_eq!(
        data(&store, &new).await.as_deref(),
        Some(r#"{"user":"ann","cart":1}"#)
    );
    assert!(store.load(&old, false).await.unwrap().is_none());
    let moved: Option<String> = server.cli(&["HGET", &key(&old), "moved"]);
    assert_eq!(moved.as_deref(), Some(new.as_str()));
    let left: Option<String> = server.cli(&["HGET", &key(&old), "user"]);
    assert_eq!(left, None);
    assert_eq!(handles_of(&store, "ann").await, vec![new.handle()]);
    assert!(!store.revoke_handle(&old.handle()).await.unwrap());
    // A write or patch through the old ID (a request in flight) cannot bring it back.
    assert_eq!(
        store
            .replace(&old, bytes(r#"{"user":"ann","cart":2}"#))
            .await
            .unwrap(),
        Landed::Missing
    );
    assert_eq!(
        store.patch(&old, &patch(r#"{"cart":3}"#)).await.unwrap(),
        PatchOutcome::Missing
    );
    assert!(store.load(&old, false).await.unwrap().is_none());
    assert!(store.load(&old, true).await.unwrap().is_none());
    assert_eq!(handles_of(&store, "ann").await, vec![new.handle()]);
    assert_eq!(
        data(&store, &new).await.as_deref(),
        Some(r#"{"user":"ann","cart":1}"#)
    );
}

/// Redis stalls with the rotation's copy queued: the rotation fails, and the copy it then
/// deletes is gone once Redis catches up, even on a Redis that never ran the store's
/// delete script (a fresh one, or one just restarted or failed over): no second session
/// of the user is left behind, listed under an ID no browser holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_whose_copy_times_out_leaves_no_copy_behind() {
    let server = RedisServer::start();
    let armed = Arc::new(AtomicBool::new(false));
    let json = r#"{"user":"ann","orphan":7}"#;
    let marker: &'static [u8] = format!("${}\r\n{json}\r\n", json.len()).leak().as_bytes();
    // Past the copy's timeout and that of the delete sent after it.
    let port = relay_on(server.port(), Fault::Late(2500), armed.clone(), marker).await;
    let url = format!("redis://127.0.0.1:{port}");
    let store = connect(Topology::Standalone { url }, MINUTE).await;
    let (old, new) = (new_id(), new_id());
    store.create(&old, session(json)).await.unwrap();
    armed.store(true, Ordering::SeqCst);
    let rotated = store.rotate(&old, &new, MINUTE).await;
    assert!(rotated.is_err(), "{rotated:?}");
    // The late copy, then what the rotation sent after it, have run by now.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(server.cli::<i64>(&["EXISTS", &key(&new)]), 0);
    assert_eq!(handles_of(&store, "ann").await, vec![old.handle()]);
    assert_eq!(data(&store, &old).await.as_deref(), Some(json));
}

/// The first marking never reaches Redis: it is sent once more.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_whose_marking_was_lost_is_done_whole_or_not_at_all() {
    rotation_with_lost_shorten_reply(Fault::Hold).await;
}
