//! The proxy over real Redis: stored form, fail-closed behaviour when Redis goes away,
//! recovery, and each topology (standalone, Sentinel, Cluster) end to end.

mod support;

#[path = "support/redis.rs"]
#[allow(dead_code)]
mod redis_harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis_harness::{RedisCluster, RedisSentinel, RedisServer};
use serde_json::json;
use session_proxy::config::{ClusterConfig, Config, SentinelConfig, StoreType};
use support::{App, Browser, Client, Proxy, q};

fn standalone(server: &RedisServer) -> impl FnOnce(&mut Config) + '_ {
    move |c| {
        c.store.kind = StoreType::Redis;
        c.store.url = Some(server.url());
        c.store.response_timeout = 0.5;
        c.store.connect_timeout = 0.5;
        c.session.exclude = vec!["/static/**".into()];
    }
}

fn through_sentinel(sentinel: &RedisSentinel) -> impl FnOnce(&mut Config) + '_ {
    move |c| {
        c.store.kind = StoreType::Redis;
        c.store.sentinel = Some(SentinelConfig {
            master: redis_harness::SENTINEL_MASTER.to_string(),
            nodes: sentinel.sentinel_urls(),
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_is_stored_under_prefix_and_id_as_readable_json_with_its_ttl() {
    let server = RedisServer::start();
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        standalone(&server)(c);
        c.store.key_prefix = "shop:".into();
        c.session.max_age = 300;
    })
    .await;
    let browser = Browser::with_session(&proxy, r#"{"user":"ann","cart":[]}"#).await;
    let id = browser.cookie.clone().unwrap();
    let key = format!("shop:{id}");
    let data: String = server.cli(&["HGET", &key, "data"]);
    assert_eq!(data, r#"{"user":"ann","cart":[]}"#);
    let ttl: i64 = server.cli(&["TTL", &key]);
    assert!((295..=300).contains(&ttl), "TTL {ttl}");
    // Redis does not count the sessions: no gauge rather than one stuck at 0.
    let metrics = support::get_text(&format!("http://{}/metrics", proxy.admin.unwrap())).await;
    assert!(
        metrics.contains("session_proxy_requests_total"),
        "{metrics}"
    );
    assert!(!metrics.contains("active_sessions"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_on_access_resets_the_ttl_without_rewriting_the_data() {
    let server = RedisServer::start();
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        standalone(&server)(c);
        c.session.max_age = 100;
        c.session.renew_on_access = true;
    })
    .await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let key = format!("session:{}", browser.cookie.clone().unwrap());
    let _: () = server.cli(&["PEXPIRE", &key, "5000"]);
    let _: () = server.cli(&["HSET", &key, "data", r#"{"a":1}"#]);
    let version: i64 = server.cli(&["HGET", &key, "ver"]);
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), json!({"a": 1}));
    let ttl: i64 = server.cli(&["PTTL", &key]);
    assert!(ttl > 90_000, "TTL not reset: {ttl} ms");
    let after: i64 = server.cli(&["HGET", &key, "ver"]);
    assert_eq!(after, version, "renewal rewrote the data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_then_recovers_by_itself() {
    let mut server = RedisServer::start();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let app = App::start(Arc::new(move |req| {
        counter.fetch_add(1, Ordering::SeqCst);
        Box::pin(support::scripted(req))
    }))
    .await;
    let proxy = Proxy::with(&app, standalone(&server)).await;
    let client = Client::new();
    let browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    let before = seen.load(Ordering::SeqCst);

    server.stop();
    let r = client
        .get(&proxy.url("/account"), &[("cookie", &cookie)])
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert!(
        r.set_cookies().is_empty(),
        "cookie cleared because of a store error"
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        before,
        "request forwarded without its session"
    );
    assert!(
        proxy
            .metric("session_proxy_store_errors_total{op=\"load\",kind=\"unavailable\"}")
            .await
            >= 1.0
    );
    let admin = format!("http://{}/readyz", proxy.admin.unwrap());
    assert_eq!(client.get(&admin, &[]).await.status, 503);
    let r = client
        .get(&proxy.url("/static/app.css"), &[("cookie", &cookie)])
        .await;
    assert_eq!(r.status, 200, "excluded routes keep working");
    assert!(r.header_seen("x-session").is_empty());

    server.restart();
    // Redis runs without persistence here, so the session itself is gone: the store
    // answering again (200, empty session, stale cookie cleared) is recovery. The very
    // first request after Redis is back gets it, on the worker's connection as on the
    // admin port's.
    let r = client
        .get(&proxy.url("/account"), &[("cookie", &cookie)])
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.session_seen(), json!({}));
    assert_eq!(client.get(&admin, &[]).await.status, 200);
}

/// The proxy's connections to `server`, by the last command each ran.
fn proxy_connections_by_last_command(server: &RedisServer) -> Vec<String> {
    let list: String = server.cli(&["CLIENT", "LIST"]);
    list.lines()
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("cmd=")))
        .filter(|cmd| !cmd.starts_with("client"))
        .map(str::to_string)
        .collect()
}

/// Reads the session `browser` holds over six kept-alive client connections (two on each
/// of a proxy's three workers), then counts on each of `servers` the connections whose
/// last command was a session read (`HMGET`).
async fn connections_reading_sessions(
    proxy: &Proxy,
    browser: &Browser,
    servers: &[&RedisServer],
) -> Vec<usize> {
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    let clients: Vec<Client> = (0..6).map(|_| Client::new()).collect();
    for client in &clients {
        let r = client.get(&proxy.url("/"), &[("cookie", &cookie)]).await;
        assert_eq!(r.status, 200);
        assert!(r.session_seen().is_object());
    }
    servers
        .iter()
        .map(|server| {
            let mut cmds = proxy_connections_by_last_command(server);
            cmds.retain(|cmd| cmd == "hmget");
            cmds.len()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_thread_reads_sessions_over_its_own_redis_connection() {
    let server = RedisServer::start();
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        standalone(&server)(c);
        c.limits.workers = 3;
    })
    .await;
    let browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    assert_eq!(
        connections_reading_sessions(&proxy, &browser, &[&server]).await,
        [3],
        "one connection per worker"
    );

    // Everything off the workers (here the admin port's readiness check) shares one more.
    let admin = format!("http://{}/readyz", proxy.admin.unwrap());
    assert_eq!(Client::new().get(&admin, &[]).await.status, 200);
    let mut all = proxy_connections_by_last_command(&server);
    all.sort();
    // (The readiness check reads a key under the prefix.)
    assert_eq!(all, ["exists", "hmget", "hmget", "hmget"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_did_not_persist_is_never_answered_with_success() {
    let mut server = RedisServer::start();
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, standalone(&server)).await;
    let browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    // The app takes its time; Redis dies after the session was read, before the write.
    let url = proxy.url(&format!("/?delay_ms=600&update={}", q(r#"{"a":2}"#)));
    let pending =
        tokio::spawn(async move { Client::new().get(&url, &[("cookie", &cookie)]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.stop();
    let r = pending.await.unwrap();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.set_cookies().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_work_through_sentinel_one_master_connection_per_worker() {
    let sentinel = RedisSentinel::start();
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        through_sentinel(&sentinel)(c);
        c.limits.workers = 3;
    })
    .await;
    let mut browser = Browser::with_session(&proxy, r#"{"via":"sentinel"}"#).await;
    let key = format!("session:{}", browser.cookie.clone().unwrap());
    let data: String = sentinel.master().cli(&["HGET", &key, "data"]);
    assert_eq!(data, r#"{"via":"sentinel"}"#);
    assert_eq!(
        browser.get(&proxy.url("/")).await.session_seen(),
        json!({"via": "sentinel"})
    );
    assert_eq!(
        connections_reading_sessions(&proxy, &browser, &[sentinel.master()]).await,
        [3],
        "one connection to the master per worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sentinel_failover_every_worker_moves_to_the_new_master_without_a_write() {
    let sentinel = Arc::new(RedisSentinel::start());
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        through_sentinel(&sentinel)(c);
        c.store.response_timeout = 0.5;
        c.limits.workers = 3;
    })
    .await;
    let browser = Browser::with_session(&proxy, r#"{"n":0}"#).await;
    let old = sentinel.master_port();
    assert_eq!(
        connections_reading_sessions(&proxy, &browser, &[sentinel.master()]).await,
        [3]
    );
    let new_port = tokio::task::spawn_blocking({
        let sentinel = sentinel.clone();
        move || sentinel.failover()
    })
    .await
    .unwrap();
    assert_ne!(new_port, old);

    // Reads alone: the demoted master (a replica now) still answers them, so only the
    // Sentinels' announcement can move the proxy. Every worker gets there.
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    let clients: Vec<Client> = (0..6).map(|_| Client::new()).collect();
    let start = std::time::Instant::now();
    loop {
        for client in &clients {
            let r = client.get(&proxy.url("/"), &[("cookie", &cookie)]).await;
            assert_eq!(r.session_seen(), json!({"n": 0}));
        }
        let mut on_new = proxy_connections_by_last_command(sentinel.server(new_port));
        on_new.retain(|cmd| cmd == "hmget");
        if on_new.len() == 3 {
            eprintln!(
                "every worker reads from the new master {:?} after the failover",
                start.elapsed()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "reads still on the old master: {} worker(s) moved",
            on_new.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // So the first write on each worker is accepted.
    for (i, client) in clients.iter().enumerate() {
        let url = proxy.url(&format!("/?update={}", q(&format!(r#"{{"n":{i}}}"#))));
        let r = client.get(&url, &[("cookie", &cookie)]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let key = format!("session:{}", browser.cookie.clone().unwrap());
    let data: String = sentinel.server(new_port).cli(&["HGET", &key, "data"]);
    assert_eq!(data, r#"{"n":5}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_cluster_nodes_one_connection_per_worker() {
    let cluster = RedisCluster::start();
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        c.store.kind = StoreType::Redis;
        c.store.cluster = Some(ClusterConfig {
            nodes: cluster.urls(),
        });
        c.limits.workers = 3;
    })
    .await;
    // One session lives on one node, which each worker reaches over its own connection.
    let browser = Browser::with_session(&proxy, r#"{"n":"first"}"#).await;
    let nodes: Vec<&RedisServer> = cluster.nodes().iter().collect();
    let mut reading = connections_reading_sessions(&proxy, &browser, &nodes).await;
    reading.sort();
    assert_eq!(reading, [0, 0, 3], "one connection to the node per worker");

    let mut browsers = Vec::new();
    for i in 0..30 {
        let mut b = Browser::new();
        b.get(&proxy.url(&format!("/?update={}", q(&format!(r#"{{"n":{i}}}"#)))))
            .await;
        browsers.push(b);
    }
    for (i, b) in browsers.iter_mut().enumerate() {
        assert_eq!(b.get(&proxy.url("/")).await.session_seen(), json!({"n": i}));
    }
    let per_node: Vec<i64> = cluster
        .nodes()
        .iter()
        .map(|n| n.cli::<i64>(&["DBSIZE"]))
        .collect();
    assert_eq!(per_node.iter().sum::<i64>(), 31, "{per_node:?}");
    assert!(
        per_node.iter().all(|n| *n > 0),
        "keys not spread over the nodes: {per_node:?}"
    );
}

/// The proxy binary with `--store URL`, its CA store replaced by `ca` (rediss://
/// certificates are verified against the system roots, which `SSL_CERT_FILE` replaces).
struct TlsProxy {
    child: std::process::Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl TlsProxy {
    async fn start(app: &App, store: &str, ca: &std::path::Path) -> TlsProxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::env::temp_dir().join(format!("sp-tls-{port}.log"));
        let stderr = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_session-proxy"))
            .args([
                "--listen",
                &addr,
                "--upstream",
                &app.url(),
                "--store",
                store,
                "--admin-listen",
                "null",
            ])
            .env("SSL_CERT_FILE", ca)
            .env("RUST_LOG", "warn")
            .stderr(stderr)
            .spawn()
            .unwrap();
        support::wait_for_listener(&addr).await;
        TlsProxy { child, addr, log }
    }

    /// What the proxy has logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_connects_over_tls_and_verifies_the_certificate() {
    let server = RedisServer::start_tls();
    let app = App::scripted().await;
    let proxy = TlsProxy::start(&app, &server.url(), server.ca_path().unwrap()).await;
    let mut browser = Browser::new();
    let r = browser
        .get(&format!(
            "http://{}/?update={}",
            proxy.addr,
            q(r#"{"tls":true}"#)
        ))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let key = format!("session:{}", browser.cookie.clone().unwrap());
    let out = std::process::Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            server.ca_path().unwrap().to_str().unwrap(),
        ])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.port().to_string(),
            "HGET",
            &key,
            "data",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"tls":true}"#
    );

    // A server whose certificate comes from a CA the proxy does not trust is refused.
    let stranger = RedisServer::start_tls();
    let proxy = TlsProxy::start(&app, &server.url(), stranger.ca_path().unwrap()).await;
    let r = Client::new()
        .get(
            &format!("http://{}/?update={}", proxy.addr, q(r#"{"a":1}"#)),
            &[],
        )
        .await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_redis_certificate_is_explained_in_the_log() {
    let server = RedisServer::start_tls();
    let app = App::scripted().await;
    let update = format!("/?update={}", q(r#"{"a":1}"#));
    // The client learns that the store failed; the operator, from the log, why.
    let explained = |proxy: &TlsProxy, r: &support::Reply, why: &str| {
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        let detail = r.json()["detail"].as_str().unwrap_or_default().to_string();
        assert!(!detail.contains("certificate"), "{detail}");
        let log = proxy.log();
        assert!(log.contains(why), "{log}");
    };

    // Signed by a CA that SSL_CERT_FILE does not hold.
    let stranger = RedisServer::start_tls();
    let proxy = TlsProxy::start(&app, &server.url(), stranger.ca_path().unwrap()).await;
    let r = Client::new()
        .get(&format!("http://{}{update}", proxy.addr), &[])
        .await;
    explained(&proxy, &r, "SSL_CERT_FILE");

    // Trusted, but issued for 127.0.0.1, not for the host the URL names.
    let by_name = format!("rediss://localhost:{}", server.port());
    let proxy = TlsProxy::start(&app, &by_name, server.ca_path().unwrap()).await;
    let r = Client::new()
        .get(&format!("http://{}{update}", proxy.addr), &[])
        .await;
    explained(&proxy, &r, "does not name the host");
}
