//! Micro-benchmarks of the per-request session work: IDs, the cookie, the header
//! protocol, exclusions and the memory store.
//!
//! `cargo bench --bench micro` (add `-- --quick` for a short run). The load benchmark of
//! the whole proxy is `scripts/bench.sh`; see `docs/benchmarks.md`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use session_proxy::config::SessionConfig;
use session_proxy::session::codec;
use session_proxy::session::cookie::SessionCookie;
use session_proxy::session::exclude::Exclusions;
use session_proxy::session::id::{IdShape, SessionId};
use session_proxy::store::memory::MemoryStore;
use session_proxy::store::{NewSession, Store, StoreSettings};

/// A session of about 100 bytes of JSON, the size the load benchmark uses.
const SESSION_JSON: &str = r#"{"user_id":"u-1234567","roles":["reader","editor"],"cart":[17,42,99],"theme":"dark","n":12345}"#;

/// A browser's `Cookie` header: analytics and preference cookies around the session.
fn cookie_header(id: &SessionId) -> HeaderMap {
    let value = format!(
        "_ga=GA1.2.1234567890.1700000000; theme=dark; csrftoken=Xy7Pq2Lm9Rt4Vb8Nc1Kd6Fg3Hj5Ws0Ez; \
         session={}; _gid=GA1.2.987654321.1700000000; lang=en-US",
        id.as_str()
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        COOKIE,
        HeaderValue::try_from(value).expect("ASCII cookie header"),
    );
    headers
}

fn ids(c: &mut Criterion) {
    let shape = IdShape::default();
    let id = SessionId::generate(shape);
    let bad = format!("{}!", &id.as_str()[..42]);
    let mut g = c.benchmark_group("id");
    g.bench_function("generate", |b| {
        b.iter(|| SessionId::generate(black_box(shape)))
    });
    g.bench_function("parse_valid", |b| {
        b.iter(|| shape.parse(black_box(id.as_str())))
    });
    g.bench_function("parse_invalid", |b| b.iter(|| shape.parse(black_box(&bad))));
    g.finish();
}

fn cookies(c: &mut Criterion) {
    let cookie = SessionCookie::new(&SessionConfig::default());
    let id = SessionId::generate(cookie.shape());
    let with_session = cookie_header(&id);
    let mut without_session = HeaderMap::new();
    without_session.insert(
        COOKIE,
        HeaderValue::from_static("_ga=GA1.2.1234567890.1700000000; theme=dark; lang=en-US"),
    );
    let mut g = c.benchmark_group("cookie");
    g.bench_function("find_among_6", |b| {
        b.iter(|| cookie.find(black_box(&with_session)))
    });
    g.bench_function("find_absent", |b| {
        b.iter(|| cookie.find(black_box(&without_session)))
    });
    g.bench_function("strip_among_6", |b| {
        b.iter_batched_ref(
            || with_session.clone(),
            |headers| cookie.strip(headers),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("strip_absent", |b| {
        b.iter_batched_ref(
            || without_session.clone(),
            |headers| cookie.strip(headers),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("take_among_6", |b| {
        b.iter_batched_ref(
            || with_session.clone(),
            |headers| cookie.take(headers),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("take_absent", |b| {
        b.iter_batched_ref(
            || without_session.clone(),
            |headers| cookie.take(headers),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("set_cookie", |b| b.iter(|| cookie.set(black_box(&id))));
    g.finish();
}

fn protocol(c: &mut Criterion) {
    let update = HeaderValue::try_from(STANDARD.encode(SESSION_JSON)).expect("base64");
    let mut g = c.benchmark_group("codec");
    g.bench_function("encode_100B", |b| {
        b.iter(|| codec::encode(black_box(SESSION_JSON.as_bytes())))
    });
    g.bench_function("decode_update_100B", |b| {
        b.iter(|| codec::decode_update(black_box(&update), 4096))
    });
    g.finish();
}

fn exclusions(c: &mut Criterion) {
    let patterns: Vec<String> = ["/static/**", "/assets/*.css", "/img/*.png", "/healthz"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    let exclusions = Exclusions::new(&patterns).expect("valid globs");
    let mut g = c.benchmark_group("exclude");
    for (name, path) in [
        ("matched", "/static/js/app.3f9a1c.js"),
        ("unmatched", "/account/orders/1234"),
        ("dot_segments_unmatched", "/static/../account/orders"),
        ("percent_dot_matched", "/account/%2e%2e/img/logo.png"),
    ] {
        g.bench_function(name, |b| b.iter(|| exclusions.matches(black_box(path))));
    }
    g.finish();
}

/// Runs a memory-store future, which is always ready at once.
fn ready<T>(future: impl Future<Output = T>) -> T {
    future
        .now_or_never()
        .expect("memory store futures are ready immediately")
}

fn memory_store(c: &mut Criterion) {
    let settings = StoreSettings {
        max_age: Duration::from_secs(1_209_600),
        user_key: None,
        max_bytes: 4096,
    };
    let data = Bytes::from_static(SESSION_JSON.as_bytes());
    let new_session = || NewSession {
        data: data.clone(),
        created: 1_700_000_000,
        ends: None,
    };
    // A store already holding 100 000 sessions, so lookups hit realistically sized maps.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(settings.clone(), 1_000_000));
    let shape = IdShape::default();
    let held: Vec<SessionId> = (0..100_000).map(|_| SessionId::generate(shape)).collect();
    for id in &held {
        ready(store.create(id, new_session())).expect("store has room");
    }
    let id = &held[held.len() / 2];
    let unknown = SessionId::generate(shape);

    let mut g = c.benchmark_group("memory_store");
    g.bench_function("load", |b| {
        b.iter(|| ready(store.load(black_box(id), false)))
    });
    g.bench_function("load_unknown", |b| {
        b.iter(|| ready(store.load(black_box(&unknown), false)))
    });
    g.bench_function("load_renew", |b| {
        b.iter(|| ready(store.load(black_box(id), true)))
    });
    g.bench_function("replace", |b| {
        b.iter(|| ready(store.replace(black_box(id), data.clone())))
    });
    // Each sample fills a fresh store, so memory stays bounded however many iterations
    // criterion asks for; ID generation and dropping the store are not timed.
    g.bench_function("create", |b| {
        b.iter_custom(|iters| {
            let fresh = MemoryStore::new(settings.clone(), usize::MAX);
            let ids: Vec<SessionId> = (0..iters).map(|_| SessionId::generate(shape)).collect();
            let started = Instant::now();
            for id in &ids {
                let _ = ready(fresh.create(id, new_session()));
            }
            started.elapsed()
        })
    });
    // One user with 10 000 sessions (a shared account, a script logging in in a loop):
    // filling the index and revoking them all must not cost a scan per session.
    let indexed = StoreSettings {
        user_key: Some("user_id".into()),
        ..settings.clone()
    };
    let user_data = Bytes::from_static(br#"{"user_id":"shared","cart":[1,2,3]}"#);
    let fill = |store: &MemoryStore, ids: &[SessionId]| {
        for id in ids {
            let session = NewSession {
                data: user_data.clone(),
                created: 1_700_000_000,
                ends: None,
            };
            let _ = ready(store.create(id, session));
        }
    };
    let many: Vec<SessionId> = (0..10_000).map(|_| SessionId::generate(shape)).collect();
    g.sample_size(10);
    g.bench_function("one_user_create_10k", |b| {
        b.iter_batched(
            || MemoryStore::new(indexed.clone(), usize::MAX),
            |fresh| fill(&fresh, &many),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("one_user_revoke_10k", |b| {
        b.iter_batched(
            || {
                let fresh = MemoryStore::new(indexed.clone(), usize::MAX);
                fill(&fresh, &many);
                fresh
            },
            |fresh| ready(fresh.revoke_user("shared")),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group! {
    name = micro;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = ids, cookies, protocol, exclusions, memory_store
}
criterion_main!(micro);
