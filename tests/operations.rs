//! Operating the proxy: the admin port, metrics as requests flow, and the access log.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use support::{App, Browser, Client, Proxy, b64, q};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn health_and_readiness_answer_on_the_admin_port() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let status = |path: &'static str| {
        let proxy = &proxy;
        async move { proxy.admin_request("GET", path, None).await.status }
    };
    assert_eq!(status("/healthz").await, 200);
    assert_eq!(status("/readyz").await, 200);
    proxy.shutdown.begin_drain();
    assert_eq!(status("/readyz").await, 503);
    assert_eq!(status("/healthz").await, 200);
}

/// Without `admin_token`, a web page that rebinds its host name to the operator's machine
/// (DNS rebinding) could reach `/sessions`: requests a browser makes (with `Origin` or
/// `Sec-Fetch-Site`) or that name the port by a host name are refused there; the probes,
/// the CLI's requests and programs that send `Sec-Fetch-Mode` alone (Node's `fetch`) are
/// not. With a token set, a request that carries it is served from anywhere.
#[tokio::test]
async fn the_sessions_api_refuses_requests_from_browsers() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.user_key = Some("user".into())).await;
    let admin = proxy.admin.unwrap();
    let client = Client::new();
    for header in [
        ("origin", "http://rebound.example"),
        ("sec-fetch-site", "same-origin"),
    ] {
        for (method, path) in [
            ("GET", "/sessions?user=ann"),
            ("DELETE", "/sessions?user=ann"),
            ("DELETE", "/sessions/some-handle"),
        ] {
            let url = format!("http://{admin}{path}");
            let r = client.request(method, &url, &[header], Bytes::new()).await;
            assert_eq!(r.status, 403, "{method} {path} with {header:?}");
            assert_eq!(r.headers["content-type"], "application/problem+json");
            let detail = r.json()["detail"].as_str().unwrap().to_string();
            assert!(detail.contains("not for browsers"), "{detail}");
        }
        for probe in ["/healthz", "/readyz", "/metrics"] {
            let url = format!("http://{admin}{probe}");
            let r = client.request("GET", &url, &[header], Bytes::new()).await;
            assert_eq!(r.status, 200, "{probe} with {header:?}");
        }
    }
    let r = proxy.admin_request("GET", "/sessions?user=ann", None).await;
    assert_eq!(r.status, 200);
    // Without admin_token, only requests addressed to an IP address or localhost: a
    // rebound host name is refused, even on a GET a page could send bare.
    let port = admin.port();
    let url = format!("http://{admin}/sessions?user=ann");
    for (host, status) in [
        (format!("rebound.example:{port}"), 403),
        ("rebound.example".to_string(), 403),
        (format!("localhost:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        (format!("[::1]:{port}"), 200),
    ] {
        let r = client
            .request("GET", &url, &[("host", &host)], Bytes::new())
            .await;
        assert_eq!(r.status, status, "Host: {host}");
    }
    let probe = format!("http://{admin}/metrics");
    let r = client
        .request("GET", &probe, &[("host", "rebound.example")], Bytes::new())
        .await;
    assert_eq!(r.status, 200, "the probes answer any Host");
    // Node's fetch sends Sec-Fetch-Mode on every request: not taken for a browser.
    let r = client
        .request("GET", &url, &[("sec-fetch-mode", "cors")], Bytes::new())
        .await;
    assert_eq!(r.status, 200, "Sec-Fetch-Mode alone");

    // With admin_token set, a request that carries it is served whatever else it sends:
    // a page has no token to send.
    let proxy = Proxy::with(&app, |c| {
        c.session.user_key = Some("user".into());
        c.admin_token = Some("s3cret-admin-token".into());
    })
    .await;
    let admin = proxy.admin.unwrap();
    let url = format!("http://{admin}/sessions?user=ann");
    let browser_like = [
        ("authorization", "Bearer s3cret-admin-token"),
        ("origin", "http://app.example"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-mode", "cors"),
        ("host", "admin.example"),
    ];
    let r = client
        .request("GET", &url, &browser_like, Bytes::new())
        .await;
    assert_eq!(r.status, 200, "with the token");
    let r = client
        .request("GET", &url, &browser_like[1..], Bytes::new())
        .await;
    assert_eq!(r.status, 401, "without it");
}

/// Requests the HTTP/1 parser refuses and answers itself (a malformed head: 400; too
/// many fields: 431) are counted like any other answer, with no session.
#[tokio::test]
async fn requests_the_parser_refuses_are_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let many: String = (0..120).map(|i| format!("x-f{i}: v\r\n")).collect();
    let requests = [
        ("GARBAGE\r\n\r\n".to_string(), "400"),
        (
            "GET / HTTP/1.1\r\nhost: x\r\nbad header: y\r\n\r\n".to_string(),
            "400",
        ),
        (format!("GET / HTTP/1.1\r\nhost: x\r\n{many}\r\n"), "431"),
    ];
    for (request, status) in &requests {
        let text = support::raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
    }
    let refused = "session_proxy_requests_total{status=\"4xx\",session=\"none\"}";
    assert_eq!(proxy.metric(refused).await, 3.0);
    let requests = "session_proxy_request_duration_seconds_count";
    assert_eq!(proxy.metric(requests).await, 3.0);

    // An HTTP/2 preface after an HTTP/1 request gets no answer from hyper: nothing more
    // is counted than that request.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        head.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert_eq!(proxy.metric(requests).await, 4.0);
    assert_eq!(proxy.metric(refused).await, 3.0);
}

/// While the proxy drains, an HTTP/1 client's keep-alive connection is closed after the
/// answer it is on, with `Connection: close`, on both of the proxy's HTTP/1 paths (a
/// request without a body, and one with): clients move to new connections before the
/// old ones are closed under them.
#[tokio::test]
async fn while_draining_answers_close_their_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = App::scripted().await;
    let requests: [&[u8]; 2] = [
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi",
    ];
    for request in requests {
        let proxy = Proxy::with(&app, |_| {}).await;
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let n = s.read(&mut buf).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(!answer.contains("connection: close"), "{answer}");

        proxy.shutdown.begin_drain();
        s.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
            .await
            .expect("the connection closes after the answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert_eq!(answer.matches("connection:").count(), 1, "{answer}");
    }
    // An HTTP/1.0 client that asked to keep its connection gets one answer or the other.
    let proxy = Proxy::with(&app, |_| {}).await;
    proxy.shutdown.begin_drain();
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(answer.starts_with("http/1."), "{answer}");
    assert!(
        !(answer.contains("close") && answer.contains("keep-alive")),
        "{answer}"
    );
}

/// Requests the proxy fails are counted with what they did with their session: an
/// excluded path stays excluded, a request without a session has none.
#[tokio::test]
async fn failed_requests_are_counted_with_their_session_outcome() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        c.session.exclude = vec!["/static/**".into()];
        // Nothing listens there: every request fails with 502.
        c.upstream = "http://127.0.0.1:1".into();
    })
    .await;
    let mut b = Browser::new();
    assert_eq!(b.get(&proxy.url("/static/x.css")).await.status, 502);
    assert_eq!(b.get(&proxy.url("/")).await.status, 502);
    for (metric, value) in [
        (
            "session_proxy_requests_total{status=\"5xx\",session=\"excluded\"}",
            1.0,
        ),
        (
            "session_proxy_requests_total{status=\"5xx\",session=\"none\"}",
            1.0,
        ),
    ] {
        assert_eq!(proxy.metric(metric).await, value, "{metric}");
    }
}

#[tokio::test]
async fn metrics_move_as_requests_flow() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.exclude = vec!["/static/**".into()]).await;
    let mut b = Browser::new();
    b.get(&proxy.url("/")).await; // none
    b.get(&proxy.url(&format!("/?update={}", q(r#"{"a":1}"#))))
        .await; // created
    b.get(&proxy.url("/")).await; // read
    b.get(&proxy.url(&format!("/?patch={}", q(r#"{"b":2}"#))))
        .await; // updated
    b.get(&proxy.url("/static/x.css")).await; // excluded
    b.get(&proxy.url(&format!("/?raw={}", q("!!")))).await; // 502 violation
    b.get(&proxy.url("/?status=404")).await; // read, 4xx
    b.get(&proxy.url("/?update=%7B%7D")).await; // destroyed

    let expect = [
        (
            "session_proxy_requests_total{status=\"2xx\",session=\"none\"}",
            1.0,
        ),
        (
            "session_proxy_requests_total{status=\"2xx\",session=\"created\"}",
            1.0,
        ),
        (
            "session_proxy_requests_total{status=\"2xx\",session=\"read\"}",
            1.0,
        ),
        (
            "session_proxy_requests_total{status=\"2xx\",session=\"updated\"}",
            1.0,
        ),
        (
            "session_proxy_requests_total{status=\"2xx\",session=\"excluded\"}",
            1.0,
        ),
        (
            "session_proxy_requests_total{status=\"2xx\",session=\"destroyed\"}",
            1.0,
        ),
        (
            "session_proxy_requests_total{status=\"4xx\",session=\"read\"}",
            1.0,
        ),
        (
            "session_proxy_requests_total{status=\"5xx\",session=\"read\"}",
            1.0,
        ),
        ("session_proxy_protocol_violations_total", 1.0),
        ("session_proxy_request_duration_seconds_count", 8.0),
        ("session_proxy_upstream_duration_seconds_count", 8.0),
        ("session_proxy_store_operations_total{op=\"create\"}", 1.0),
        ("session_proxy_store_operations_total{op=\"patch\"}", 1.0),
        ("session_proxy_store_operations_total{op=\"delete\"}", 1.0),
        (
            "session_proxy_store_operation_duration_seconds_count{op=\"load\"}",
            5.0,
        ),
        ("session_proxy_active_sessions", 0.0),
    ];
    for (metric, value) in expect {
        assert_eq!(proxy.metric(metric).await, value, "{metric}");
    }
    let text = support::get_text(&format!("http://{}/metrics", proxy.admin.unwrap())).await;
    for family in [
        "session_proxy_websocket_tunnels_open",
        "session_proxy_connections_open",
    ] {
        assert!(text.contains(family), "{family} missing from /metrics");
    }
}

/// Prometheus's text format by default; OpenMetrics for a scraper that asks for it.
#[tokio::test]
async fn metrics_come_in_the_format_the_scraper_asks_for() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    Browser::new().get(&proxy.url("/")).await;
    let plain = proxy.admin_request("GET", "/metrics", None).await;
    assert_eq!(
        plain
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8_lossy(&plain.body).into_owned();
    assert!(!text.contains("# EOF"), "{text}");
    // Every sample belongs to a family its `# TYPE` line names: a counter's family is
    // named `…_total`, like its samples.
    let families: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();
    assert!(families.contains(&("session_proxy_requests_total", "counter")));
    for sample in text.lines().filter(|l| !l.starts_with('#')) {
        let name = sample.split(['{', ' ']).next().unwrap_or_default();
        assert!(
            families.iter().any(|(family, kind)| match *kind {
                "histogram" => name
                    .strip_prefix(family)
                    .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s)),
                _ => name == *family,
            }),
            "{sample} belongs to no declared family"
        );
    }

    let open = Client::new()
        .request(
            "GET",
            &format!("http://{}/metrics", proxy.admin.unwrap()),
            &[(
                "accept",
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            )],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        open.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = String::from_utf8_lossy(&open.body);
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE session_proxy_requests counter"));
}

#[tokio::test]
async fn websocket_tunnels_are_counted_while_open() {
    let app = App::websocket().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut ws = support::websocket(&proxy.addr.to_string()).await;
    ws.send(Message::text("hi")).await.unwrap();
    ws.next().await.unwrap().unwrap();
    assert_eq!(
        proxy.metric("session_proxy_websocket_tunnels_open").await,
        1.0
    );
    // The tunnel is still the client's connection.
    assert_eq!(proxy.metric("session_proxy_connections_open").await, 1.0);
    ws.close(None).await.ok();
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.metric("session_proxy_websocket_tunnels_open").await != 0.0
        || proxy.metric("session_proxy_connections_open").await != 0.0
    {
        assert!(
            Instant::now() < deadline,
            "tunnel gauge did not return to 0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn access_log_has_one_json_line_per_request_without_ids_or_data() {
    let app = App::scripted().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_session-proxy"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &app.url(),
            "--admin-listen",
            "null",
        ])
        .env("SESSION_PROXY_LOG__FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    support::wait_for_listener(&format!("127.0.0.1:{port}")).await;
    let secret_data = r#"{"card":"4111-1111"}"#;
    let mut b = Browser::new();
    b.get(&format!("{base}/login?update={}", q(secret_data)))
        .await;
    let id = b.cookie.clone().unwrap();
    b.get(&format!("{base}/account")).await;
    b.get(&format!("{base}/missing?status=404")).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    // The drain delay (5 s by default) keeps it alive a little: kill it after reading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains(&id), "session ID in the log");
    assert!(
        !log.contains("4111") && !log.contains(&b64(secret_data)),
        "session data in the log"
    );
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "session_proxy::access")
        .collect();
    assert_eq!(access.len(), 3, "{log}");
    let paths: Vec<&str> = access.iter().map(|v| v["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/login", "/account", "/missing"]);
    assert_eq!(access[0]["session"], "created");
    assert_eq!(access[1]["session"], "read");
    assert_eq!(access[2]["status"], 404);
    let tag = access[0]["session_tag"].as_str().unwrap();
    assert_eq!(tag.len(), 8);
    assert_eq!(
        access[1]["session_tag"], tag,
        "the same session is followed through the log"
    );
    for line in &access {
        assert_eq!(line["method"], "GET");
        assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
        // In milliseconds to the microsecond: no floating-point noise in the log.
        let written = line["duration_ms"].to_string();
        let decimals = written.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(decimals <= 3, "duration_ms {written}");
    }
}
