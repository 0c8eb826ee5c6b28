//! Soak test: the release proxy under mixed load for minutes, checking every answer and
//! watching the proxy's memory and file descriptors.
//!
//! ```sh
//! scripts/soak.sh [MINUTES]                      # builds release, then runs this
//! target/release/examples/soak [MINUTES] [PROXY]  # PROXY: target/release/session-proxy
//! ```
//!
//! The driver starts a small HTTP/1.1 application in-process and the proxy binary as a
//! child (memory store, or the Redis URL in `SOAK_STORE`; `/static/**` excluded, the
//! per-user index on, log level warn, free loopback ports).
//! Then, until the time is up, HTTP clients, each with its own session, send about 50%
//! session reads, 20% writes (a counter in `X-Session-Patch`, every tenth one with
//! `X-Session-Rotate`), 20% excluded requests, 5% anonymous reads and 5% logouts
//! (`X-Session-Update: {}`), while a few WebSocket clients connect, exchange messages
//! and close in a loop. Every answer is checked (status, session content, counter,
//! cookie, echo), and the application answers 500 when it sees what it must not (the
//! session cookie anywhere, `X-Session` on an excluded path or none on a session path);
//! a mismatch or a failed request counts as lost.
//!
//! Every 10 s it samples the proxy's RSS (`VmRSS`) and open descriptors
//! (`/proc/PID/fd`). At the end it closes every connection, stops the proxy with
//! SIGTERM and prints a summary. RSS is flat when the last minute's average is within
//! 10% + 4 MiB of the second minute's; descriptors are flat when, under load, the last
//! minute's average is within 10% + 5 of the second minute's and, once the connections
//! are closed, the count is back within 5 of the count before any traffic. (Runs shorter
//! than five minutes compare the second and last fifths instead of minutes.) The exit
//! status is non-zero when anything was lost or something is not flat.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::RngExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// HTTP clients, each with its own session, one request at a time.
const HTTP_CLIENTS: usize = 32;
/// WebSocket clients, each connecting, exchanging messages and closing in a loop.
const WS_CLIENTS: usize = 4;
const WS_MESSAGES: usize = 20;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const COOKIE_NAME: &str = "session";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let minutes: f64 = match args.next().map(|a| a.parse()) {
        None => 10.0,
        Some(Ok(m)) if m > 0.0 => m,
        Some(_) => {
            eprintln!("usage: soak [MINUTES] [PROXY_BINARY]");
            return ExitCode::from(2);
        }
    };
    let binary = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "target/release/session-proxy".into()),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("soak: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(soak(Duration::from_secs_f64(minutes * 60.0), binary)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Counts of checked requests, by kind, and of lost ones.
#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    writes: AtomicU64,
    rotations: AtomicU64,
    excluded: AtomicU64,
    anonymous: AtomicU64,
    logouts: AtomicU64,
    ws_sessions: AtomicU64,
    ws_messages: AtomicU64,
    lost: AtomicU64,
    /// The first few losses, for the summary.
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn lose(&self, what: String) {
        self.lost.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut examples) = self.examples.lock()
            && examples.len() < 10
        {
            examples.push(what);
        }
    }

    fn http_total(&self) -> u64 {
        [
            &self.reads,
            &self.writes,
            &self.excluded,
            &self.anonymous,
            &self.logouts,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// One sample of the proxy process.
#[derive(Clone, Copy)]
struct Sample {
    /// Seconds since the load started.
    at: f64,
    rss_kib: u64,
    fds: usize,
}

fn sample(pid: u32, at: f64) -> std::io::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(Sample { at, rss_kib, fds })
}

async fn soak(duration: Duration, binary: PathBuf) -> Result<bool, String> {
    let tally = Arc::new(Tally::default());
    let app_stop = CancellationToken::new();
    let app_connections = TaskTracker::new();
    let app_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind the application: {e}"))?;
    let app_addr = app_listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(serve_app(
        app_listener,
        app_connections.clone(),
        app_stop.clone(),
    ));

    let mut proxy = ProxyProcess::start(&binary, app_addr)?;
    let pid = proxy.child.id();
    let base = format!("http://{}", proxy.listen);
    let before = sample(pid, 0.0).map_err(|e| format!("cannot read /proc/{pid}: {e}"))?;
    println!(
        "soak: proxy pid {pid} on {}, application on {app_addr}, {:.1} minutes, \
         {HTTP_CLIENTS} HTTP + {WS_CLIENTS} WebSocket clients",
        proxy.listen,
        duration.as_secs_f64() / 60.0
    );
    println!(
        "before load: rss {} KiB, fds {}",
        before.rss_kib, before.fds
    );

    let started = Instant::now();
    let deadline = started + duration;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let load = TaskTracker::new();
    for worker in 0..HTTP_CLIENTS {
        load.spawn(http_client(
            worker,
            client.clone(),
            base.clone(),
            deadline,
            tally.clone(),
        ));
    }
    for worker in 0..WS_CLIENTS {
        load.spawn(ws_client(worker, proxy.listen, deadline, tally.clone()));
    }
    load.close();

    let mut samples = Vec::new();
    let mut last_total = 0;
    let mut next = started + SAMPLE_EVERY;
    while next <= deadline + Duration::from_millis(500) {
        tokio::time::sleep_until(next.into()).await;
        let s = sample(pid, started.elapsed().as_secs_f64())
            .map_err(|e| format!("proxy process gone? {e}"))?;
        let total = tally.http_total();
        println!(
            "t={:>4.0}s rss {:>7} KiB  fds {:>4}  http {:>8} ({:>5.0}/s)  ws {:>5}  lost {}",
            s.at,
            s.rss_kib,
            s.fds,
            total,
            (total - last_total) as f64 / SAMPLE_EVERY.as_secs_f64(),
            tally.ws_sessions.load(Ordering::Relaxed),
            tally.lost.load(Ordering::Relaxed),
        );
        last_total = total;
        samples.push(s);
        next += SAMPLE_EVERY;
    }
    load.wait().await;

    // Close every connection: the clients' (dropping the pool) and the application's
    // side of the proxy's upstream pool; then the descriptor count must be back to
    // where it was before any traffic.
    drop(client);
    app_stop.cancel();
    app_connections.close();
    app_connections.wait().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = sample(pid, started.elapsed().as_secs_f64())
        .map_err(|e| format!("proxy process gone? {e}"))?;
    let exit = proxy.stop();
    let warnings = proxy.warnings();

    Ok(summarize(
        &tally, &samples, before, after, duration, exit, &warnings,
    ))
}

fn summarize(
    tally: &Tally,
    samples: &[Sample],
    before: Sample,
    after: Sample,
    duration: Duration,
    exit: String,
    warnings: &[String],
) -> bool {
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let secs = duration.as_secs_f64();
    let total = tally.http_total();
    println!("\n== soak summary ({:.1} min)", secs / 60.0);
    println!(
        "http requests: {total} ({:.0}/s): reads {}, writes {} (of which rotations {}), \
         excluded {}, anonymous reads {}, logouts {}",
        total as f64 / secs,
        n(&tally.reads),
        n(&tally.writes),
        n(&tally.rotations),
        n(&tally.excluded),
        n(&tally.anonymous),
        n(&tally.logouts),
    );
    println!(
        "websocket: {} sessions, {} messages echoed",
        n(&tally.ws_sessions),
        n(&tally.ws_messages)
    );
    let lost = n(&tally.lost);
    println!("lost: {lost}{}", if lost == 0 { " (none)" } else { "" });
    if let Ok(examples) = tally.examples.lock() {
        for e in examples.iter() {
            println!("  lost: {e}");
        }
    }

    let Some((first, last)) = samples.first().zip(samples.last()) else {
        println!("verdict: NOT FLAT (no samples)");
        return false;
    };
    let rss_max = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let fds_max = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    println!(
        "rss KiB: before {}, first {}, last {}, max {}",
        before.rss_kib, first.rss_kib, last.rss_kib, rss_max
    );
    println!(
        "fds: before {}, first {}, last {}, max {}, after closing connections {}",
        before.fds, first.fds, last.fds, fds_max, after.fds
    );

    // The second minute against the last one (fifths of the run when it is short).
    let window = (secs / 5.0).min(60.0);
    let early: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > window && s.at <= 2.0 * window + 0.5)
        .collect();
    let late: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > secs - window - 0.5)
        .collect();
    let avg = |v: &[&Sample], f: fn(&Sample) -> f64| {
        v.iter().map(|s| f(s)).sum::<f64>() / v.len().max(1) as f64
    };
    let (rss_early, rss_late) = (
        avg(&early, |s| s.rss_kib as f64),
        avg(&late, |s| s.rss_kib as f64),
    );
    let (fds_early, fds_late) = (avg(&early, |s| s.fds as f64), avg(&late, |s| s.fds as f64));
    let rss_flat = !early.is_empty() && rss_late <= rss_early * 1.10 + 4096.0;
    // Under load the count moves with the connections open at that instant (WebSocket
    // rounds, the upstream pool); the leak check proper is the count once they are closed.
    let fds_flat = !early.is_empty()
        && fds_late <= fds_early * 1.10 + 5.0
        && after.fds.abs_diff(before.fds) <= 5;
    println!(
        "rss average: early window {:.0} KiB, last window {:.0} KiB ({:+.1}%) -> {}",
        rss_early,
        rss_late,
        (rss_late / rss_early.max(1.0) - 1.0) * 100.0,
        if rss_flat { "flat" } else { "GROWING" }
    );
    println!(
        "fds average: early window {fds_early:.1}, last window {fds_late:.1}; \
         after closing {} vs before {} -> {}",
        after.fds,
        before.fds,
        if fds_flat { "flat" } else { "LEAKING" }
    );
    println!("proxy exit after SIGTERM: {exit}");
    println!("proxy warnings logged: {}", warnings.len());
    for w in warnings.iter().take(5) {
        println!("  {w}");
    }
    let ok = lost == 0 && rss_flat && fds_flat && exit == "exit status: 0";
    println!(
        "verdict: {}, {}",
        if rss_flat && fds_flat {
            "FLAT"
        } else {
            "NOT FLAT"
        },
        if lost == 0 { "nothing lost" } else { "LOST" }
    );
    ok
}

/// The proxy binary running as a child process.
struct ProxyProcess {
    child: Child,
    listen: SocketAddr,
    dir: PathBuf,
}

impl ProxyProcess {
    fn start(binary: &PathBuf, app: SocketAddr) -> Result<ProxyProcess, String> {
        let listen = free_port()?;
        let admin = free_port()?;
        let dir = std::env::temp_dir().join(format!("session-proxy-soak-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let config = dir.join("proxy.yaml");
        let store = match std::env::var("SOAK_STORE") {
            Ok(url) if url != "memory" => format!("  type: redis\n  url: \"{url}\"\n"),
            _ => "  type: memory\n".to_string(),
        };
        std::fs::write(
            &config,
            format!(
                "listen: {listen}\n\
                 upstream: http://{app}\n\
                 admin_listen: {admin}\n\
                 session:\n  exclude: [\"/static/**\"]\n  user_key: client\n\
                 store:\n{store}\
                 shutdown:\n  drain_delay: 0\n  timeout: 5\n\
                 log:\n  level: warn\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let stderr = std::fs::File::create(dir.join("proxy.log")).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut proxy = ProxyProcess { child, listen, dir };
        let up = Instant::now();
        while std::net::TcpStream::connect(listen).is_err() {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                return Err(format!(
                    "the proxy exited at start ({status}): {}",
                    proxy.warnings().join("\n")
                ));
            }
            if up.elapsed() > Duration::from_secs(10) {
                proxy.stop();
                return Err("the proxy did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(proxy)
    }

    /// SIGTERM, then the exit status (SIGKILL after 15 s).
    fn stop(&mut self) -> String {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let asked = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if asked.elapsed() < Duration::from_secs(15) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return "killed: no exit within 15 s of SIGTERM".into();
                }
            }
        }
    }

    /// What the proxy logged (level warn and above).
    fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("proxy.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<SocketAddr, String> {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

// ---------------------------------------------------------------- the application

async fn serve_app(listener: TcpListener, connections: TaskTracker, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let stop = stop.clone();
        connections.spawn(async move {
            let service = service_fn(|req| async move { Ok::<_, Infallible>(app(req)) });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

type AppResponse = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> AppResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn b64(value: &Value) -> HeaderValue {
    HeaderValue::try_from(STANDARD.encode(value.to_string()))
        .unwrap_or(HeaderValue::from_static(""))
}

/// Whether the `Cookie` header carries the proxy's session cookie.
fn carries_session_cookie(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .any(|pair| pair.trim().split('=').next() == Some(COOKIE_NAME))
}

/// The application: `/read` echoes the session, `/write` patches a counter into it,
/// `/logout` destroys it, `/static/…` is excluded, `/ws` echoes WebSocket messages.
/// Anything unexpected is answered with 500, which the client counts as lost.
fn app(mut req: Request<Incoming>) -> AppResponse {
    let path = req.uri().path().to_owned();
    if path.starts_with("/static/") {
        if req.headers().contains_key("x-session") {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "X-Session on an excluded path",
            );
        }
        if carries_session_cookie(&req) {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the session cookie reached an excluded path",
            );
        }
        return reply(StatusCode::OK, "static");
    }
    if carries_session_cookie(&req) {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the session cookie reached the app",
        );
    }
    let Some(encoded) = req.headers().get("x-session").cloned() else {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no X-Session on a session path",
        );
    };
    let session: Value = match STANDARD
        .decode(encoded.as_bytes())
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
    {
        Some(Value::Object(session)) => Value::Object(session),
        _ => {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "X-Session is not base64 JSON",
            );
        }
    };
    match path.as_str() {
        "/read" => {
            let mut r = reply(StatusCode::OK, session.to_string());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        "/write" => {
            let client = req
                .headers()
                .get("x-client")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let n = session["n"].as_u64().unwrap_or(0) + 1;
            let mut r = reply(StatusCode::OK, n.to_string());
            r.headers_mut()
                .insert("x-session-patch", b64(&json!({"client": client, "n": n})));
            if req.uri().query() == Some("rotate=1") {
                r.headers_mut()
                    .insert("x-session-rotate", HeaderValue::from_static("1"));
            }
            r
        }
        "/logout" => {
            let mut r = reply(StatusCode::OK, "bye");
            r.headers_mut()
                .insert("x-session-update", HeaderValue::from_static("e30="));
            r
        }
        "/ws" => upgrade(&mut req, encoded),
        _ => reply(StatusCode::NOT_FOUND, "no such route"),
    }
}

/// Accepts a WebSocket upgrade: greets with the session header it received, then
/// echoes every text or binary message.
fn upgrade(req: &mut Request<Incoming>, session: HeaderValue) -> AppResponse {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return reply(StatusCode::BAD_REQUEST, "not a websocket request");
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let hello = format!("session:{}", session.to_str().unwrap_or(""));
        if ws.send(Message::text(hello)).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut r = reply(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = r.headers_mut();
    h.insert("connection", HeaderValue::from_static("upgrade"));
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::try_from(accept) {
        h.insert("sec-websocket-accept", accept);
    }
    r
}

// ---------------------------------------------------------------- the clients

/// What one HTTP client knows of its own session.
struct ClientSession {
    /// Changes on every logout, so that a session of a former life is noticed.
    name: String,
    /// The cookie value (`<id>`), when the proxy has set one.
    cookie: Option<String>,
    /// The counter the session must hold (0: no session).
    n: u64,
}

/// A finished request: status, the session cookie it set or cleared, and the body.
struct Answer {
    status: StatusCode,
    /// `Some(None)`: cleared; `Some(Some(v))`: set to `v`; `None`: untouched.
    cookie: Option<Option<String>>,
    body: Bytes,
}

async fn send(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: String,
    cookie: Option<&str>,
    name: &str,
) -> Result<Answer, String> {
    let mut req = Request::builder().uri(&url).header("x-client", name);
    if let Some(value) = cookie {
        req = req.header(
            COOKIE,
            format!("theme=dark; {COOKIE_NAME}={value}; lang=en"),
        );
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let response = client
        .request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let mut cookies = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let first = v.split(';').next()?;
            let value = first.strip_prefix(COOKIE_NAME)?.strip_prefix('=')?;
            let cleared = v.contains("Max-Age=0");
            Some((!cleared).then(|| value.to_owned()))
        });
    let cookie = cookies.next();
    if cookies.next().is_some() {
        return Err(format!("{url}: two session cookies set"));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: body: {e}"))?
        .to_bytes();
    Ok(Answer {
        status,
        cookie,
        body,
    })
}

async fn http_client(
    worker: usize,
    client: Client<HttpConnector, Empty<Bytes>>,
    base: String,
    deadline: Instant,
    tally: Arc<Tally>,
) {
    let mut life = 0;
    let mut me = ClientSession {
        name: format!("c{worker}-{life}"),
        cookie: None,
        n: 0,
    };
    let mut writes = 0u64;
    while Instant::now() < deadline {
        let roll = rand::rng().random_range(0..100u32);
        let result = match roll {
            0..50 => read(&client, &base, &mut me, &tally).await,
            50..70 => {
                writes += 1;
                write(&client, &base, &mut me, writes.is_multiple_of(10), &tally).await
            }
            70..90 => excluded(&client, &base, &me, &tally).await,
            90..95 => anonymous(&client, &base, &tally).await,
            _ => {
                let result = logout(&client, &base, &me, &tally).await;
                life += 1;
                me = ClientSession {
                    name: format!("c{worker}-{life}"),
                    cookie: None,
                    n: 0,
                };
                result
            }
        };
        if let Err(what) = result {
            tally.lose(format!("{}: {what}", me.name));
            // Start over with a fresh session: the old one's state is unknown now.
            life += 1;
            me = ClientSession {
                name: format!("c{worker}-{life}"),
                cookie: None,
                n: 0,
            };
        }
    }
}

fn expect_ok(answer: &Answer, what: &str) -> Result<(), String> {
    if answer.status != StatusCode::OK {
        return Err(format!(
            "{what}: status {} ({})",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ));
    }
    Ok(())
}

async fn read(
    client: &Client<HttpConnector, Empty<Bytes>>,
    base: &str,
    me: &mut ClientSession,
    tally: &Tally,
) -> Result<(), String> {
    let a = send(
        client,
        format!("{base}/read"),
        me.cookie.as_deref(),
        &me.name,
    )
    .await?;
    expect_ok(&a, "read")?;
    if a.cookie.is_some() {
        return Err("read: a read set or cleared the cookie".into());
    }
    let got: Value = serde_json::from_slice(&a.body).map_err(|e| format!("read: {e}"))?;
    let want = if me.n == 0 {
        json!({})
    } else {
        json!({"client": me.name, "n": me.n})
    };
    if got != want {
        return Err(format!("read: session {got}, expected {want}"));
    }
    Tally::count(&tally.reads);
    Ok(())
}

async fn write(
    client: &Client<HttpConnector, Empty<Bytes>>,
    base: &str,
    me: &mut ClientSession,
    rotate: bool,
    tally: &Tally,
) -> Result<(), String> {
    let url = if rotate {
        format!("{base}/write?rotate=1")
    } else {
        format!("{base}/write")
    };
    let a = send(client, url, me.cookie.as_deref(), &me.name).await?;
    expect_ok(&a, "write")?;
    let n: u64 = std::str::from_utf8(&a.body)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("write: body is not a counter")?;
    if n != me.n + 1 {
        return Err(format!("write: counter {n}, expected {}", me.n + 1));
    }
    let Some(Some(cookie)) = a.cookie else {
        return Err("write: no session cookie set".into());
    };
    if let Some(old) = &me.cookie
        && (*old == cookie) == rotate
    {
        return Err(format!(
            "write: rotate={rotate} but the ID changed={}",
            *old != cookie
        ));
    }
    me.cookie = Some(cookie);
    me.n = n;
    Tally::count(&tally.writes);
    if rotate {
        Tally::count(&tally.rotations);
    }
    Ok(())
}

async fn excluded(
    client: &Client<HttpConnector, Empty<Bytes>>,
    base: &str,
    me: &ClientSession,
    tally: &Tally,
) -> Result<(), String> {
    let file = rand::rng().random_range(0..1000u32);
    let url = format!("{base}/static/app/{file}.js");
    let a = send(client, url, me.cookie.as_deref(), &me.name).await?;
    expect_ok(&a, "excluded")?;
    if a.cookie.is_some() || &a.body[..] != b"static" {
        return Err("excluded: cookie touched or wrong body".into());
    }
    Tally::count(&tally.excluded);
    Ok(())
}

async fn anonymous(
    client: &Client<HttpConnector, Empty<Bytes>>,
    base: &str,
    tally: &Tally,
) -> Result<(), String> {
    let a = send(client, format!("{base}/read"), None, "anonymous").await?;
    expect_ok(&a, "anonymous")?;
    if a.cookie.is_some() || &a.body[..] != b"{}" {
        return Err(format!(
            "anonymous: cookie touched or session {}",
            String::from_utf8_lossy(&a.body)
        ));
    }
    Tally::count(&tally.anonymous);
    Ok(())
}

async fn logout(
    client: &Client<HttpConnector, Empty<Bytes>>,
    base: &str,
    me: &ClientSession,
    tally: &Tally,
) -> Result<(), String> {
    let a = send(
        client,
        format!("{base}/logout"),
        me.cookie.as_deref(),
        &me.name,
    )
    .await?;
    expect_ok(&a, "logout")?;
    // Destroying a session clears the cookie; with no session there is nothing to do.
    let cleared = a.cookie == Some(None);
    if cleared != me.cookie.is_some() {
        return Err(format!(
            "logout: had a session {}, cookie cleared {cleared}",
            me.cookie.is_some()
        ));
    }
    Tally::count(&tally.logouts);
    Ok(())
}

async fn ws_client(worker: usize, proxy: SocketAddr, deadline: Instant, tally: Arc<Tally>) {
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        match ws_round(worker, round, proxy, &tally).await {
            Ok(()) => Tally::count(&tally.ws_sessions),
            Err(what) => tally.lose(format!("ws{worker} round {round}: {what}")),
        }
        // Each round is a new TCP connection: pace them so TIME_WAIT stays small.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ws_round(
    worker: usize,
    round: u64,
    proxy: SocketAddr,
    tally: &Tally,
) -> Result<(), String> {
    let request = format!("ws://{proxy}/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let hello = ws
        .next()
        .await
        .ok_or("closed before the greeting")?
        .map_err(|e| e.to_string())?;
    if hello.to_text().ok() != Some("session:e30=") {
        return Err(format!("greeting {hello:?}"));
    }
    for i in 0..WS_MESSAGES {
        let sent = if i % 4 == 3 {
            let len = rand::rng().random_range(1..4096usize);
            Message::binary(vec![(i % 251) as u8; len])
        } else {
            let salt = rand::rng().random::<u64>();
            Message::text(format!("ws{worker}-{round}-{i}-{salt:x}"))
        };
        ws.send(sent.clone())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let echo = ws
            .next()
            .await
            .ok_or("closed before the echo")?
            .map_err(|e| format!("receive: {e}"))?;
        if echo != sent {
            return Err(format!("message {i}: echo differs"));
        }
        Tally::count(&tally.ws_messages);
    }
    ws.close(None).await.map_err(|e| format!("close: {e}"))?;
    // Drain until the close handshake completes.
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}
