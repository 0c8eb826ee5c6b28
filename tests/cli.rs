//! The binary as users run it: `check`, configuration layers, the demo, and shutdown on
//! signals.

mod support;

#[path = "support/redis.rs"]
#[allow(dead_code)]
mod redis_harness;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use redis_harness::TempDir;
use support::{App, Client, q};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_session-proxy");

/// A config file in a directory of its own, removed on drop.
struct ConfigFile {
    path: PathBuf,
    _dir: TempDir,
}

impl ConfigFile {
    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

fn write_config(yaml: &str) -> ConfigFile {
    let dir = TempDir::new("cli");
    let path = dir.path().join("proxy.yaml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    ConfigFile { path, _dir: dir }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = TempDir::new("cli");
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir.path())
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn check_prints_the_effective_config_and_exits_0() {
    let path = write_config("session:\n  max_age: 60\n  secret: a-very-secret-value-1234\n");
    let out = run(
        &["check", "--config", path.arg()],
        &[("SESSION_PROXY_SESSION__COOKIE_NAME", "sid")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("max_age: 60"), "{printed}");
    assert!(printed.contains("cookie_name: sid"), "{printed}");
    assert!(
        !printed.contains("a-very-secret-value"),
        "secret printed: {printed}"
    );
}

#[test]
fn a_start_up_failure_is_logged_in_the_log_format() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let path = write_config(&format!(
        "listen: {listen}\nadmin_listen: null\nlog: {{format: json}}\n"
    ));
    let out = run(&["--config", path.arg()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let line: serde_json::Value = serde_json::from_str(last).expect("a JSON log line");
    assert_eq!(line["level"], "ERROR", "{last}");
    assert!(
        line["message"]
            .as_str()
            .unwrap_or_default()
            .contains("`listen`"),
        "{last}"
    );
    // A log that drops errors does not swallow it.
    let out = run(
        &["--config", path.arg()],
        &[("SESSION_PROXY_LOG__LEVEL", "off")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`listen`"), "{stderr}");
}

#[test]
fn check_rejects_bad_configs_with_exit_1_and_names_the_key() {
    let cases = [
        ("session:\n  max_age: 0\n", "session.max_age"),
        ("session:\n  max_aeg: 10\n", "max_aeg"),
        (
            "session:\n  cookie_name: \"bad name\"\n",
            "session.cookie_name",
        ),
        ("session:\n  same_site: sometimes\n", "session.same_site"),
        ("session:\n  id_bytes: 8\n", "session.id_bytes"),
        (
            "timeouts:\n  upstream_connect: fast\n",
            "timeouts.upstream_connect",
        ),
        ("upstream: ftp://x\n", "upstream"),
        ("listen: [1, 2]\n", "listen"),
        ("store:\n  type: redis\n", "store"),
        ("limits:\n  workers: 5000\n", "limits.workers"),
        ("session: [unclosed\n", "YAML"),
    ];
    for (yaml, key) in cases {
        let path = write_config(yaml);
        let out = run(&["check", "--config", path.arg()], &[]);
        assert_eq!(out.status.code(), Some(1), "{yaml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(key),
            "{yaml}: error does not name {key}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one message expected: {err}");
    }
    let out = run(&["check", "--config", "/nonexistent/proxy.yaml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/proxy.yaml"));
}

#[test]
fn layers_apply_defaults_then_file_then_env_then_flags() {
    let path = write_config(
        "listen: 127.0.0.1:7000\nupstream: http://127.0.0.1:7100\nsession:\n  max_age: 10\n",
    );
    let env = [
        ("SESSION_PROXY_CONFIG", path.arg()),
        ("SESSION_PROXY_LISTEN", "127.0.0.1:7001"),
        ("SESSION_PROXY_UPSTREAM", "http://127.0.0.1:7101"),
        ("SESSION_PROXY_SESSION__MAX_AGE", "3600"),
        ("SESSION_PROXY_SESSION__EXCLUDE", "/static/**,/favicon.ico"),
        ("SESSION_PROXY_STORE__KEY_PREFIX", "app:"),
    ];
    let out = run(&["check", "--listen", "127.0.0.1:7002"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("listen: 127.0.0.1:7002"), "{printed}");
    assert!(
        printed.contains("upstream: http://127.0.0.1:7101"),
        "{printed}"
    );
    assert!(printed.contains("max_age: 3600"), "{printed}");
    assert!(
        printed.contains("key_prefix: app:") || printed.contains("key_prefix: \"app:\""),
        "{printed}"
    );
    assert!(printed.contains("/favicon.ico"), "{printed}");
    assert!(
        printed.contains("cookie_name: session"),
        "defaults kept: {printed}"
    );
}

#[test]
fn store_flag_selects_redis_and_masks_its_password() {
    let out = run(
        &["check", "--store", "redis://:hunter2@127.0.0.1:6379/1"],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("type: redis"), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
    let out = run(&["check", "--store", "memcached://x"], &[]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn proxy_yaml_in_the_working_directory_is_read_by_default() {
    let dir = TempDir::new("cli");
    std::fs::write(
        dir.path().join("proxy.yaml"),
        "session:\n  cookie_name: fromfile\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("cookie_name: fromfile"));
}

/// A proxy process with its own config, stopped on drop.
struct Running {
    child: Child,
    addr: String,
    admin: String,
    config: ConfigFile,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    async fn start(upstream: &str, extra: &str) -> Running {
        let (port, admin_port) = (free_port(), free_port());
        let yaml = format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin_port}\nupstream: {upstream}\n{extra}"
        );
        let config = write_config(&yaml);
        let child = Command::new(BIN)
            .args(["--config", config.arg()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let running = Running {
            child,
            addr: format!("127.0.0.1:{port}"),
            admin: format!("127.0.0.1:{admin_port}"),
            config,
        };
        support::wait_for_listener(&running.admin).await;
        running
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn ready_status(&self) -> u16 {
        Client::new()
            .get(&format!("http://{}/readyz", self.admin), &[])
            .await
            .status
            .as_u16()
    }

    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not exit in {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

#[tokio::test]
async fn sigterm_drains_finishes_in_flight_requests_and_exits_0() {
    let app = App::scripted().await;
    let mut proxy =
        Running::start(&app.url(), "shutdown:\n  drain_delay: 1\n  timeout: 10\n").await;
    assert_eq!(proxy.ready_status().await, 200);
    let slow_url = format!("http://{}/slow?delay_ms=2000", proxy.addr);
    let slow = tokio::spawn(async move { Client::new().get(&slow_url, &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        proxy.ready_status().await,
        503,
        "readiness turns 503 at once"
    );
    // During the drain delay new connections are still served.
    let r = Client::new()
        .get(&format!("http://{}/during-drain", proxy.addr), &[])
        .await;
    assert_eq!(r.status, 200);
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "in-flight request completed");
    assert_eq!(r.json()["path"], "/slow");
    assert_eq!(proxy.exit_code(Duration::from_secs(10)).await, Some(0));
}

/// How many worker threads the proxy has once `expected` of them carry their name, or
/// after 5 s: a thread takes its name when it first runs, which on a busy machine may be
/// a moment after the proxy answers.
async fn workers_named(pid: u32, expected: usize) -> usize {
    let started = std::time::Instant::now();
    loop {
        let count = worker_ticks(pid).len();
        if count >= expected || started.elapsed() > Duration::from_secs(5) {
            // A moment more, so that a thread too many would show too.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return worker_ticks(pid).len();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The proxy's worker threads (named `worker-N`) and the CPU ticks each has used.
fn worker_ticks(pid: u32) -> Vec<u64> {
    let mut ticks = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        // `pid (comm) state …`: utime and stime are the 12th and 13th fields after comm.
        let (head, rest) = stat.split_once(") ").unwrap();
        let name = head.split_once(" (").unwrap().1;
        if name.starts_with("worker-") {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            ticks.push(fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap());
        }
    }
    ticks
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_are_spread_over_the_configured_worker_threads() {
    let app = App::scripted().await;
    let default = Running::start(&app.url(), "").await;
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        workers_named(default.child.id(), cpus).await,
        cpus,
        "one per CPU"
    );
    drop(default);

    let proxy = Running::start(&app.url(), "limits:\n  workers: 3\n").await;
    assert_eq!(workers_named(proxy.child.id(), 3).await, 3);
    let before = worker_ticks(proxy.child.id());
    // Six keep-alive connections at once: two per worker.
    let load: Vec<_> = (0..6)
        .map(|_| {
            let url = format!("http://{}/", proxy.addr);
            tokio::spawn(async move {
                let client = Client::new();
                for _ in 0..400 {
                    assert_eq!(client.get(&url, &[]).await.status, 200);
                }
            })
        })
        .collect();
    for task in load {
        task.await.unwrap();
    }
    let after = worker_ticks(proxy.child.id());
    let busy = before.iter().zip(&after).filter(|(b, a)| a > b).count();
    assert_eq!(
        busy, 3,
        "every worker served requests: {before:?} -> {after:?}"
    );

    // Each worker counts on its own; /metrics adds them up.
    let metrics = support::get_text(&format!("http://{}/metrics", proxy.admin)).await;
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {metrics}"))
    };
    assert_eq!(
        value("session_proxy_requests_total{status=\"2xx\",session=\"none\"}"),
        2400.0
    );
    assert_eq!(
        value("session_proxy_request_duration_seconds_count"),
        2400.0
    );
    assert_eq!(
        value("session_proxy_request_duration_seconds_bucket{le=\"+Inf\"}"),
        2400.0
    );
    assert_eq!(
        value("session_proxy_upstream_duration_seconds_count"),
        2400.0
    );
}

/// Reaching `limits.max_connections` is said in the log (the connections past it wait
/// in the accept queue, where nothing else would show them).
#[tokio::test]
async fn reaching_the_connection_cap_is_logged() {
    let listen = format!("127.0.0.1:{}", free_port());
    let (mut child, seen) = watched(
        &["--listen", &listen, "--admin-listen", "null"],
        &[("SESSION_PROXY_LIMITS__MAX_CONNECTIONS", "1")],
        "warn",
    );
    support::wait_for_listener(&listen).await;
    let first = tokio::net::TcpStream::connect(&listen).await.unwrap();
    let _second = tokio::net::TcpStream::connect(&listen).await.unwrap();
    let parts = ["WARN", "limits.max_connections (1) reached"];
    assert!(line_with(&seen, &parts, Duration::from_secs(5)).is_some());
    // Once a minute at most, however often the cap is met.
    drop(first);
    for _ in 0..3 {
        drop(tokio::net::TcpStream::connect(&listen).await.unwrap());
    }
    assert_eq!(line_with(&seen, &parts, Duration::from_secs(1)), None);
    let _ = child.kill();
    let _ = child.wait();
}

/// What `shutdown.timeout` cut is counted in its warning, to size the timeout by.
#[tokio::test]
async fn the_shutdown_timeout_says_what_it_cut() {
    let app = App::scripted().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let (mut child, seen) = watched(
        &[
            "--upstream",
            &app.url(),
            "--listen",
            &listen,
            "--admin-listen",
            "null",
        ],
        &[
            ("SESSION_PROXY_SHUTDOWN__DRAIN_DELAY", "0"),
            ("SESSION_PROXY_SHUTDOWN__TIMEOUT", "0.5"),
        ],
        "warn",
    );
    support::wait_for_listener(&listen).await;
    for _ in 0..2 {
        let slow_url = format!("http://{listen}/slow?delay_ms=20000");
        tokio::spawn(async move { Client::new().get(&slow_url, &[]).await });
    }
    // Both are with the application.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.connections.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the requests never reached the application"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let parts = ["shutdown.timeout reached", "connections=2", "tunnels=0"];
    let warned = line_with(&seen, &parts, Duration::from_secs(5));
    assert!(warned.is_some(), "no count of what was cut");
    let _ = child.wait();
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let app = App::scripted().await;
    let mut proxy =
        Running::start(&app.url(), "shutdown:\n  drain_delay: 5\n  timeout: 30\n").await;
    let slow_url = format!("http://{}/slow?delay_ms=20000", proxy.addr);
    tokio::spawn(async move { Client::new().get(&slow_url, &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal("-INT");
    let code = proxy.exit_code(Duration::from_secs(2)).await;
    assert_eq!(code, Some(1));
}

#[tokio::test]
async fn websocket_tunnel_survives_the_drain_and_ends_the_shutdown_when_closed() {
    let app = App::websocket().await;
    let mut proxy =
        Running::start(&app.url(), "shutdown:\n  drain_delay: 0.5\n  timeout: 20\n").await;
    let mut ws = support::websocket(&proxy.addr).await;
    proxy.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The listener has closed by now; the tunnel still works.
    assert!(
        tokio::net::TcpStream::connect(&proxy.addr).await.is_err(),
        "listener still open"
    );
    ws.send(Message::text("after drain")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "after drain");
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "exited with a tunnel open"
    );
    ws.close(None).await.ok();
    drop(ws);
    assert_eq!(proxy.exit_code(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test]
async fn gigabyte_bodies_stream_with_flat_memory() {
    const TOTAL: usize = 1 << 30;
    let app = App::start(std::sync::Arc::new(|req| {
        Box::pin(async move {
            use http_body_util::BodyExt;
            if req.method() == http::Method::POST {
                let mut body = req.into_body();
                let mut n = 0usize;
                while let Some(Ok(frame)) = body.frame().await {
                    n += frame.data_ref().map_or(0, |d| d.len());
                }
                return http::Response::new(support::full(n.to_string()));
            }
            let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
            let stream =
                futures_util::stream::iter((0..TOTAL >> 20).map(move |_| {
                    Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))
                }));
            http::Response::new(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
        })
    }))
    .await;
    let proxy = Running::start(&app.url(), "").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();

    let req = http::Request::get(format!("http://{}/download", proxy.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let mut body = client.request(req).await.unwrap().into_body();
    let mut received = 0usize;
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(received, TOTAL);

    let chunk = bytes::Bytes::from(vec![9u8; 1 << 20]);
    let upload = futures_util::stream::iter(
        (0..TOTAL >> 20)
            .map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = http::Request::post(format!("http://{}/upload", proxy.addr))
        .body(http_body_util::StreamBody::new(upload))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let counted = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(counted, TOTAL.to_string());

    let peak = proxy.peak_rss_kib();
    assert!(
        peak < 64 * 1024,
        "proxy peak RSS {peak} KiB while streaming 2 GiB"
    );
}

#[tokio::test]
async fn demo_serves_a_working_session_app() {
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", "null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    support::wait_for_listener(&format!("127.0.0.1:{port}")).await;
    let mut browser = support::Browser::new();
    let page = browser.get(&format!("{base}/")).await;
    assert_eq!(page.status, 200);
    assert!(
        browser.cookie.is_some(),
        "the visit counter created a session"
    );
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    let r = browser
        .client
        .request(
            "POST",
            &format!("{base}/login"),
            &[
                ("cookie", &cookie),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            bytes::Bytes::from(format!("user={}", q("ann"))),
        )
        .await;
    assert_eq!(r.status, 303);
    let rotated = r.session_cookie().expect("login rotates the session ID");
    assert_ne!(format!("session={rotated}"), cookie);
    let r = browser
        .client
        .get(
            &format!("{base}/api/session"),
            &[("cookie", &format!("session={rotated}"))],
        )
        .await;
    assert_eq!(r.json()["user"], "ann");
    let _ = child.kill();
    let _ = child.wait();
}

/// The demo's invitation comes once the proxy listens, with the address it is bound to
/// and loopback for a wildcard one; a failed bind is said without it.
#[tokio::test]
async fn demo_names_the_address_it_listens_on_once_bound() {
    let (_child, seen) = watched(
        &["demo", "--listen", "0.0.0.0:0", "--admin-listen", "null"],
        &[],
        "info",
    );
    let line = line_with(&seen, &["demo: open"], Duration::from_secs(10)).expect("the greeting");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL")
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    assert!(!url.ends_with(":0"), "the bound port, not 0: {line}");
    let page = Client::new().get(&format!("{url}/"), &[]).await;
    assert_eq!(page.status, 200);

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let out = run(
        &["demo", "--listen", &listen, "--admin-listen", "null"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen"), "{err}");
    assert!(!err.contains("demo: open"), "{err}");
}

/// The demo is configured like the proxy (file, environment, flags); only the
/// application and the store are its own.
#[tokio::test]
async fn demo_takes_its_settings_from_the_configuration_layers() {
    let (port, admin) = (free_port(), free_port());
    let config = write_config("session:\n  cookie_name: democ\n");
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["demo", "--config", config.arg()])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .env("SESSION_PROXY_LISTEN", &listen)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    support::wait_for_listener(&listen).await;
    let client = support::Client::new();
    let page = client.get(&format!("http://{listen}/"), &[]).await;
    assert_eq!(page.status, 200);
    let cookies = page.set_cookies();
    assert!(
        cookies.iter().any(|c| c.starts_with("democ=")),
        "{cookies:?}"
    );
    let health = client
        .get(&format!("http://127.0.0.1:{admin}/healthz"), &[])
        .await;
    assert_eq!(health.status, 200);
    let _ = child.kill();
    let _ = child.wait();

    for flag in ["--store", "--upstream"] {
        let out = run(&["demo", flag, "redis://127.0.0.1:1"], &[]);
        assert_eq!(out.status.code(), Some(1), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag}: {err}");
    }
}

#[tokio::test]
async fn sessions_command_lists_and_revokes_through_the_admin_port() {
    let app = App::scripted().await;
    let proxy = Running::start(
        &app.url(),
        "admin_token: token-for-tests\nsession:\n  user_key: user_id\n",
    )
    .await;
    let mut ann = support::Browser::new();
    ann.get(&format!(
        "http://{}/login?update={}",
        proxy.addr,
        q(r#"{"user_id":"ann"}"#)
    ))
    .await;
    let mut ann2 = support::Browser::new();
    ann2.get(&format!(
        "http://{}/login?update={}",
        proxy.addr,
        q(r#"{"user_id":"ann"}"#)
    ))
    .await;
    let config = proxy.config.arg().to_string();
    let sessions = |args: &[&str]| {
        let mut all = vec!["sessions"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", &config]);
        let out = Command::new(BIN).args(&all).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, listed, err) = sessions(&["list", "--user", "ann"]);
    assert_eq!(code, Some(0), "{err}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let handles: Vec<String> = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["handle"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(handles.len(), 2);
    let (code, out, err) = sessions(&["revoke", "--handle", &handles[0]]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"revoked\":1"), "{out}");
    let (code, out, err) = sessions(&["revoke", "--user", "ann"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"revoked\":1"), "{out}");
    for b in [&mut ann, &mut ann2] {
        let r = b.get(&format!("http://{}/", proxy.addr)).await;
        assert_eq!(r.session_seen(), serde_json::json!({}));
    }
    let (code, _, err) = sessions(&["revoke", "--handle", &handles[0]]);
    assert_eq!(code, Some(1));
    assert!(err.contains("404"), "{err}");
}

/// Handles are base64url, so about one in 32 begins with `-`; user names may too. Such a
/// value after `--handle` or `--user` is the value, not an unknown flag.
#[test]
fn handles_and_users_beginning_with_a_dash_are_values() {
    let admin = format!("127.0.0.1:{}", free_port());
    for args in [
        ["sessions", "revoke", "--handle", "-qAbC"],
        ["sessions", "revoke", "--user", "-ann"],
        ["sessions", "list", "--user", "-ann"],
    ] {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--admin-listen", &admin]);
        let out = run(&all, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("cannot reach the admin port"),
            "{args:?}: {err}"
        );
    }
}

/// `sessions revoke` takes a user or a handle, and says so when given neither or both.
#[test]
fn revoke_asks_for_a_user_or_a_handle() {
    for args in [
        &["sessions", "revoke"][..],
        &["sessions", "revoke", "--user", "ann", "--handle", "h"][..],
    ] {
        let out = run(args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("Usage: session-proxy sessions revoke <--user <USER>|--handle <HANDLE>>"),
            "{args:?}: {err}"
        );
    }
}

/// Waits up to `within` for a line of `seen` that holds every one of `parts`.
fn line_with(
    seen: &std::sync::mpsc::Receiver<String>,
    parts: &[&str],
    within: Duration,
) -> Option<String> {
    let deadline = Instant::now() + within;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match seen.recv_timeout(left) {
            Ok(line) if parts.iter().all(|p| line.contains(p)) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// The start-up line names the store, a Redis password masked, and where the admin port
/// listens, or that it is off.
#[test]
fn the_start_up_line_names_the_store_and_the_admin_port() {
    // Nothing listens there: the proxy starts all the same, and warns.
    let redis = format!("redis://app:hunter2@127.0.0.1:{}/0", free_port());
    let masked = redis.replace("hunter2", "********");
    let admin = format!("127.0.0.1:{}", free_port());
    let cases = [
        (
            vec!["--admin-listen", "null"],
            vec!["store=memory".to_string(), "admin=off".to_string()],
        ),
        (
            vec!["--store", &redis, "--admin-listen", &admin],
            vec![
                "store=redis ".to_string(),
                format!("store_at={masked}"),
                format!("admin={admin}"),
            ],
        ),
    ];
    for (args, parts) in cases {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args = args;
        args.extend(["--listen", &listen]);
        let (_child, seen) = watched(&args, &[], "info");
        let line = line_with(&seen, &["session-proxy listening"], Duration::from_secs(10))
            .expect("the start-up line");
        for part in &parts {
            assert!(line.contains(part.as_str()), "{part}: {line}");
        }
        assert!(!line.contains("hunter2"), "{line}");
    }
}

/// A store that is not there at start-up, or goes away, is named in a warning (where the
/// proxy looks for it included), and its return in a note: not only `/readyz` knows.
#[tokio::test]
async fn the_store_going_away_and_coming_back_is_logged() {
    let mut server = redis_harness::RedisServer::start();
    server.stop();
    let (listen, admin) = (free_port(), free_port());
    let (mut child, seen) = watched(
        &[
            "--store",
            &server.url(),
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ],
        &[],
        "info",
    );
    let address = format!("127.0.0.1:{}", server.port());
    let down = [
        "WARN",
        "refused the connection",
        address.as_str(),
        "/readyz",
    ];
    let warned = line_with(&seen, &down, Duration::from_secs(10));
    assert!(warned.is_some(), "no warning at start-up");
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    let client = Client::new();
    assert_eq!(client.get(&readyz, &[]).await.status, 503);
    // Said once, not at every check.
    assert_eq!(line_with(&seen, &down, Duration::from_millis(500)), None);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(&readyz, &[]).await.status != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = line_with(&seen, &["answers again"], Duration::from_secs(5));
    assert!(back.is_some(), "no note of the store's return");

    server.stop();
    assert_eq!(client.get(&readyz, &[]).await.status, 503);
    assert!(line_with(&seen, &down, Duration::from_secs(5)).is_some());
    let _ = child.kill();
    let _ = child.wait();
}

/// Without an admin port (no `/readyz` to check again), a store missing at start-up is
/// checked until it answers, so that its return is logged too.
#[tokio::test]
async fn without_an_admin_port_the_stores_return_is_logged_too() {
    let mut server = redis_harness::RedisServer::start();
    server.stop();
    let listen = format!("127.0.0.1:{}", free_port());
    let (mut child, seen) = watched(
        &[
            "--store",
            &server.url(),
            "--listen",
            &listen,
            "--admin-listen",
            "null",
        ],
        &[],
        "info",
    );
    let warned = line_with(
        &seen,
        &["WARN", "refused the connection"],
        Duration::from_secs(10),
    );
    let warned = warned.expect("no warning at start-up");
    assert!(!warned.contains("/readyz"), "{warned}");
    server.restart();
    let back = line_with(&seen, &["answers again"], Duration::from_secs(15));
    assert!(back.is_some(), "no note of the store's return");
    let _ = child.kill();
    let _ = child.wait();
}

/// An answer the application breaks off (fewer bytes than its length) reaches the client
/// cut short, and the log says so: the access log has counted it by its head, a 200.
#[tokio::test]
async fn an_answer_the_application_breaks_off_is_logged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", app.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial";
                let _ = s.write_all(answer).await;
            });
        }
    });
    let listen = format!("127.0.0.1:{}", free_port());
    let (mut child, seen) = watched(
        &[
            "--upstream",
            &upstream,
            "--listen",
            &listen,
            "--admin-listen",
            "null",
        ],
        &[],
        "warn",
    );
    support::wait_for_listener(&listen).await;
    // Through the proxy's own HTTP/1.1, and through hyper's (a request with a body).
    for request in [
        &b"GET /half HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        b"POST /half HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nZ",
    ] {
        let mut s = tokio::net::TcpStream::connect(&listen).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.ends_with("partial"), "{got}");
        let warned = line_with(&seen, &["WARN", "answer broke off"], Duration::from_secs(5));
        assert!(warned.is_some(), "{}", String::from_utf8_lossy(request));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A Redis that may evict keys when full is named in a warning at start-up: evicting a
/// user's index would make "log out everywhere" miss sessions.
#[test]
fn an_evicting_redis_is_warned_about_at_start_up() {
    let server = redis_harness::RedisServer::start();
    for (limit, policy, warned) in [
        ("100mb", "allkeys-lru", true),
        ("100mb", "noeviction", false),
        // No memory limit: nothing is ever evicted.
        ("0", "volatile-lru", false),
    ] {
        let _: String = server.cli(&["CONFIG", "SET", "maxmemory", limit]);
        let _: String = server.cli(&["CONFIG", "SET", "maxmemory-policy", policy]);
        let listen = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(BIN)
            .args(["--store", &server.url(), "--listen", &listen])
            .args(["--admin-listen", "null"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let seen = stderr_lines(&mut child);
        let deadline = Instant::now() + Duration::from_secs(if warned { 10 } else { 3 });
        let mut warning = None;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match seen.recv_timeout(left) {
                Ok(line) if line.contains("maxmemory-policy") => {
                    warning = Some(line);
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        match warning {
            Some(line) => {
                assert!(warned, "{policy}: {line}");
                assert!(
                    line.contains(policy) && line.contains("noeviction"),
                    "{line}"
                );
            }
            None => assert!(!warned, "{policy}: no warning"),
        }
    }
}

/// A `RUST_LOG` that lets none of the proxy's lines through (`warning` reads as a target;
/// `hyper=debug` has no level for the rest) is used as given, and one that does not parse
/// is ignored; either is said once on stderr at start-up.
#[test]
fn a_rust_log_that_silences_the_proxy_is_pointed_out() {
    for (rust_log, says) in [
        ("warning", "RUST_LOG's `warning`"),
        (
            "hyper=debug",
            "lets none of the proxy's own log lines through",
        ),
        ("session_proxy=warning", "is not a valid filter"),
    ] {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(BIN)
            .args(["--listen", &listen, "--admin-listen", "null"])
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let seen = stderr_lines(&mut child);
        let line = seen.recv_timeout(Duration::from_secs(10));
        let _ = child.kill();
        let _ = child.wait();
        let line = line.expect("a line on stderr");
        assert!(line.contains(says), "{rust_log}: {line}");
    }
}

/// With `log.format: json`, what is said past the log's filter (the `RUST_LOG` hint, a
/// failure to start the filter drops) is a JSON line like every other.
#[test]
fn lines_said_past_the_filter_are_json_in_json_mode() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["--listen", &listen, "--admin-listen", "null"])
        .env("RUST_LOG", "warning")
        .env("SESSION_PROXY_LOG__FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert_eq!(lines[0]["level"], "WARN", "{err}");
    assert!(
        lines[0]["message"].as_str().unwrap().contains("RUST_LOG"),
        "{err}"
    );
    assert_eq!(lines[1]["level"], "ERROR", "{err}");
    assert!(
        lines[1]["message"]
            .as_str()
            .unwrap()
            .contains("cannot listen"),
        "{err}"
    );
    assert!(
        lines[1]["timestamp"].as_str().is_some_and(|t| t.len() > 10),
        "{err}"
    );
}

/// Starts the proxy with `args` and `env` at log level `level`: the process, killed
/// when the test ends, and the lines of its stderr as they come.
fn watched(
    args: &[&str],
    env: &[(&str, &str)],
    level: &str,
) -> (Reaped, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped)
        .unwrap();
    let seen = stderr_lines(&mut child);
    (child, seen)
}

/// A proxy process killed when the test ends, however it ends.
struct Reaped(Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines `child` writes to its piped stderr, as they come.
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    seen
}
