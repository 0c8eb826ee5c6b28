//! A faithful proxy: streaming both ways, keep-alive, hop-by-hop headers,
//! `X-Forwarded-*`, HTTP/2 clients, WebSocket, and the errors the proxy answers itself.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use support::{App, AppBody, Client, Proxy, full, q};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn stream_body(rx: mpsc::Receiver<Bytes>) -> AppBody {
    let stream = tokio_stream_from(rx).map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
    BodyExt::boxed(StreamBody::new(stream))
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Bytes>) -> impl futures_util::Stream<Item = Bytes> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn response_body_streams_without_buffering() {
    // The app sends a first chunk, then waits until the client has received it through
    // the proxy before it sends the rest: a buffering proxy would deadlock here.
    let (release_tx, release_rx) = mpsc::channel::<()>(1);
    let release_rx = Arc::new(Mutex::new(release_rx));
    let app = App::start(Arc::new(move |_req| {
        let release_rx = release_rx.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"data: first\n\n")).await.ok();
                release_rx.lock().await.recv().await;
                tx.send(Bytes::from_static(b"data: second\n\n")).await.ok();
            });
            let mut r = Response::new(stream_body(rx));
            r.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            r
        })
    }))
    .await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = Request::get(proxy.url("/events"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event arrived before the response ended")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "data: first\n\n");
    release_tx.send(()).await.unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: second\n\n");
}

#[tokio::test]
async fn request_body_streams_without_buffering() {
    // The app reports each chunk it receives; the client sends the second chunk only
    // after the app has seen the first.
    let (seen_tx, mut seen_rx) = mpsc::channel::<Bytes>(4);
    let app = App::start(Arc::new(move |req| {
        let seen_tx = seen_tx.clone();
        Box::pin(async move {
            let mut body = req.into_body();
            let mut total = 0;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    total += data.len();
                    seen_tx.send(data).await.ok();
                }
            }
            Response::new(full(total.to_string()))
        })
    }))
    .await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let body =
        StreamBody::new(tokio_stream_from(rx).map(|b| Ok::<_, std::io::Error>(Frame::data(b))));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = Request::post(proxy.url("/upload")).body(body).unwrap();
    let pending = tokio::spawn(async move { client.request(req).await });
    tx.send(Bytes::from_static(b"part one;")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await
        .expect("app saw the first chunk while the upload was still open")
        .unwrap();
    assert_eq!(first, "part one;");
    tx.send(Bytes::from_static(b"part two")).await.unwrap();
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "17");
}

/// A `GET` or `HEAD` may carry a body: whatever its framing, the application gets it
/// (and the client's framing is not passed on beside the proxy's own).
#[tokio::test]
async fn a_get_or_head_body_reaches_the_application_whatever_its_framing() {
    let app = App::start(Arc::new(|req| {
        Box::pin(async move {
            let framing = ["content-length", "transfer-encoding"]
                .map(|name| req.headers().get_all(name).iter().count());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut response = Response::new(full(body.clone()));
            let seen = format!("{} {framing:?}", String::from_utf8_lossy(&body));
            response
                .headers_mut()
                .insert("x-seen", http::HeaderValue::try_from(seen).unwrap());
            response
        })
    }))
    .await;
    let proxy = Proxy::with(&app, |_| {}).await;
    for method in ["GET", "HEAD"] {
        for framing in ["transfer-encoding: chunked", "content-length: 5"] {
            let body = if framing.starts_with("transfer") {
                "5\r\nhello\r\n0\r\n\r\n"
            } else {
                "hello"
            };
            let request = format!(
                "{method} /q HTTP/1.1\r\nhost: x\r\n{framing}\r\nconnection: close\r\n\r\n{body}"
            );
            let text = support::raw_exchange(proxy.addr, request.as_bytes())
                .await
                .to_ascii_lowercase();
            assert!(
                text.starts_with("http/1.1 200"),
                "{method}, {framing}: {text}"
            );
            // One framing field upstream, whichever the proxy chose.
            let seen = ["x-seen: hello [1, 0]", "x-seen: hello [0, 1]"];
            assert!(
                seen.iter().any(|s| text.contains(s)),
                "{method}, {framing}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let client = Client::new();
    for _ in 0..10 {
        assert_eq!(client.get(&proxy.url("/"), &[]).await.status, 200);
    }
    assert_eq!(app.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let app = App::start(Arc::new(|req| {
        Box::pin(async move {
            let seen: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
            let mut r = Response::new(full(seen.join(",")));
            let h = r.headers_mut();
            h.insert("connection", HeaderValue::from_static("x-resp-hop"));
            h.insert("x-resp-hop", HeaderValue::from_static("1"));
            h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
            h.insert("x-resp-kept", HeaderValue::from_static("1"));
            r
        })
    }))
    .await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let r = Client::new()
        .get(
            &proxy.url("/"),
            &[
                ("connection", "x-req-hop"),
                ("x-req-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic eDp5"),
                ("proxy-connection", "keep-alive"),
                ("x-req-kept", "1"),
            ],
        )
        .await;
    let seen = String::from_utf8_lossy(&r.body).to_string();
    for hop in [
        "x-req-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            !seen.split(',').any(|h| h == hop),
            "{hop} reached the app: {seen}"
        );
    }
    assert!(seen.split(',').any(|h| h == "x-req-kept"), "{seen}");
    assert!(!r.headers.contains_key("x-resp-hop"));
    assert!(!r.headers.contains_key("proxy-authenticate"));
    assert_eq!(r.headers["x-resp-kept"], "1");
}

#[tokio::test]
async fn client_connection_header_cannot_remove_the_session_headers() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut browser = support::Browser::new();
    browser
        .get(&proxy.url(&format!("/?update={}", q(r#"{"a":1}"#))))
        .await;
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    let r = Client::new()
        .get(
            &proxy.url("/"),
            &[
                ("cookie", &cookie),
                ("connection", "x-session, x-session-handle, x-forwarded-for"),
            ],
        )
        .await;
    assert_eq!(r.session_seen(), serde_json::json!({"a": 1}));
    assert_eq!(r.header_seen("x-session-handle").len(), 1);
    assert_eq!(r.header_seen("x-forwarded-for"), vec!["127.0.0.1"]);
}

#[tokio::test]
async fn forwarded_headers_are_added_and_host_is_kept() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let r = Client::new()
        .get(
            &proxy.url("/"),
            &[("host", "shop.example"), ("x-forwarded-for", "203.0.113.9")],
        )
        .await;
    assert_eq!(r.header_seen("host"), vec!["shop.example"]);
    assert_eq!(
        r.header_seen("x-forwarded-for"),
        vec!["203.0.113.9, 127.0.0.1"]
    );
    assert_eq!(r.header_seen("x-forwarded-proto"), vec!["http"]);
    assert_eq!(r.header_seen("x-forwarded-host"), vec!["shop.example"]);
}

/// Forwarding information only a proxy can give comes from this one alone: what a client
/// sends as `Forwarded`, `X-Real-IP` or another `X-Forwarded-*` (or a look-alike) never
/// reaches the application, on excluded paths either.
#[tokio::test]
async fn forwarding_headers_the_proxy_does_not_set_are_dropped() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.exclude = vec!["/static/**".into()]).await;
    let forged = [
        ("forwarded", "for=6.6.6.6;proto=https;host=evil"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/admin"),
        ("x_forwarded_server", "evil"),
        ("x-custom", "kept"),
        // Who the user is, from a proxy in front (oauth2-proxy): that proxy's to vouch for.
        ("x-forwarded-user", "ann"),
    ];
    for path in ["/", "/static/app.js"] {
        let r = Client::new().get(&proxy.url(path), &forged).await;
        for (name, _) in &forged[..5] {
            assert!(
                r.header_seen(name).is_empty(),
                "{path}: {name} reached the app"
            );
        }
        assert_eq!(r.header_seen("x-custom"), vec!["kept"], "{path}");
        assert_eq!(r.header_seen("x-forwarded-user"), vec!["ann"], "{path}");
        assert_eq!(r.header_seen("x-forwarded-proto"), vec!["http"], "{path}");
    }
}

/// With `trust_forwarded` (an ingress in front that sets them), the forwarding fields
/// reach the application as the ingress set them: `X-Forwarded-Proto: https` survives,
/// the client's address is still appended to `X-Forwarded-For`, and the proxy sets
/// `X-Forwarded-Proto` and `-Host` only when they are missing.
#[tokio::test]
async fn trusted_forwarding_fields_are_passed_on_as_the_proxy_in_front_set_them() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        c.trust_forwarded = true;
        c.session.exclude = vec!["/static/**".into()];
    })
    .await;
    let from_ingress = [
        ("host", "shop.example"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "www.shop.example"),
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/shop"),
        // What many ingresses pass on as a client wrote it: still removed.
        ("forwarded", "for=6.6.6.6;proto=https;host=evil"),
        ("x-real-ip", "6.6.6.6"),
        ("x-original-url", "/admin"),
    ];
    for path in ["/", "/static/app.js"] {
        let r = Client::new().get(&proxy.url(path), &from_ingress).await;
        assert_eq!(r.header_seen("x-forwarded-proto"), vec!["https"], "{path}");
        assert_eq!(
            r.header_seen("x-forwarded-host"),
            vec!["www.shop.example"],
            "{path}"
        );
        assert_eq!(
            r.header_seen("x-forwarded-for"),
            vec!["203.0.113.9, 127.0.0.1"],
            "{path}"
        );
        for (name, value) in &from_ingress[4..6] {
            assert_eq!(r.header_seen(name), vec![*value], "{path}: {name}");
        }
        for (name, _) in &from_ingress[6..] {
            assert!(
                r.header_seen(name).is_empty(),
                "{path}: {name} reached the app"
            );
        }
    }
    // Missing, they are set as without trust.
    let r = Client::new()
        .get(&proxy.url("/"), &[("host", "shop.example")])
        .await;
    assert_eq!(r.header_seen("x-forwarded-proto"), vec!["http"]);
    assert_eq!(r.header_seen("x-forwarded-host"), vec!["shop.example"]);
}

/// Servers that read names the CGI way (Unicorn, Thin) take `Content_Length` for
/// `Content-Length` and size the body by it: look-alikes of the fields that frame a body
/// never reach the application, whose request the proxy frames itself.
#[tokio::test]
async fn look_alikes_of_the_body_framing_headers_are_dropped() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.exclude = vec!["/static/**".into()]).await;
    let look_alikes = [
        ("Content_Length", "40"),
        ("content.length", "40"),
        ("Transfer_Encoding", "chunked"),
        ("Transfer~Encoding", "chunked"),
    ];
    for path in ["/", "/static/app.js"] {
        // Without a body (the proxy's own HTTP/1.1) and with one (hyper's).
        for (method, body, length) in [("GET", "", None), ("POST", "a body", Some("6"))] {
            let r = Client::new()
                .request(method, &proxy.url(path), &look_alikes, Bytes::from(body))
                .await;
            assert_eq!(r.status, 200, "{method} {path}");
            for (name, _) in look_alikes {
                let seen = r.header_seen(&name.to_ascii_lowercase());
                assert!(seen.is_empty(), "{method} {path}: {name} reached the app");
            }
            assert_eq!(
                r.header_seen("content-length").first().map(String::as_str),
                length,
                "{method} {path}"
            );
            assert!(r.header_seen("transfer-encoding").is_empty());
        }
    }
}

/// An HTTP/2 connection to the proxy (with prior knowledge), driven in the background.
async fn http2_to(proxy: &Proxy) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let io =
        hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    let (h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    h2
}

/// Sends `request` as written (it asks to close the connection) and reads the answer
/// whole: its text, and what the scripted application says it received.
async fn raw_request(proxy: &Proxy, request: &[u8]) -> (String, serde_json::Value) {
    let text = support::raw_exchange(proxy.addr, request).await;
    let seen = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or_else(|| panic!("no JSON body: {text}"));
    (text, seen)
}

/// An absolute-form target with a query but no path asks for the root, with its query:
/// through the proxy's own HTTP/1.1 and through hyper (a request with a body).
#[tokio::test]
async fn an_absolute_target_without_a_path_reaches_the_root_with_its_query() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    for request in [
        &b"GET http://good.example?x=1 HTTP/1.1\r\nhost: good.example\r\nconnection: close\r\n\r\n"[..],
        b"POST http://good.example:80?x=1 HTTP/1.1\r\nhost: good.example\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
    ] {
        let (text, seen) = raw_request(&proxy, request).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert_eq!(seen["target"], "/?x=1", "{text}");
    }
    // Over HTTP/2 a `:path` must start with `/`: `?x=1` is malformed, not the root.
    let mut h2 = http2_to(&proxy).await;
    let req = Request::get("http://good.example?x=1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = h2.send_request(req).await.unwrap();
    assert_eq!(answer.status(), 400);
}

/// A target with an authority of its own names the host, whatever `Host` says: an
/// absolute-form target (RFC 9112 §3.2.2) or an HTTP/2 `:authority` (RFC 9113 §8.3.1),
/// without user information.
#[tokio::test]
async fn the_targets_authority_wins_over_host() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let (_, seen) = raw_request(
        &proxy,
        b"GET http://good.example/abs HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(seen["headers"]["host"], serde_json::json!(["good.example"]));
    assert_eq!(
        seen["headers"]["x-forwarded-host"],
        serde_json::json!(["good.example"])
    );

    let mut h2 = http2_to(&proxy).await;
    for (uri, host) in [
        ("http://good.example/h2", Some("evil.example")),
        ("http://user:pw@good.example/h2", None),
    ] {
        let mut req = Request::get(uri);
        if let Some(host) = host {
            req = req.header("host", host);
        }
        let resp = h2
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            seen["headers"]["host"],
            serde_json::json!(["good.example"]),
            "{uri}"
        );
    }
}

#[tokio::test]
async fn status_codes_headers_and_bodies_pass_unchanged() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let r = Client::new()
        .get(
            &proxy.url(&format!("/teapot?status=418&cache={}", q("max-age=5"))),
            &[],
        )
        .await;
    assert_eq!(r.status, 418);
    assert_eq!(r.headers["cache-control"], "max-age=5");
    assert_eq!(r.json()["path"], "/teapot");
}

#[tokio::test]
async fn upstream_path_prefix_is_prepended() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.upstream = format!("{}/base", app.url())).await;
    let r = Client::new().get(&proxy.url("/x?y=1"), &[]).await;
    assert_eq!(r.json()["path"], "/base/x");
}

/// A path whose `..` segments climb above the root is refused: behind a path prefix it
/// would name something outside it, for an application that resolves dot segments.
/// Dot segments that stay inside pass as they are.
#[tokio::test]
async fn a_path_that_climbs_above_the_root_is_refused() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.upstream = format!("{}/base/", app.url())).await;
    for path in [
        "/../admin",
        "/%2e%2e/admin",
        "/a/../../admin",
        "/..",
        "/..%5cadmin",
        "/..;/admin",
    ] {
        let r = Client::new().get(&proxy.url(path), &[]).await;
        assert_eq!(r.status, 400, "{path}");
        assert!(
            r.json()["detail"]
                .as_str()
                .unwrap_or_default()
                .contains(".."),
            "{path}: {}",
            r.json()
        );
    }
    let r = Client::new().get(&proxy.url("/a/../x"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/base/a/../x");
}

#[tokio::test]
async fn http2_clients_are_served_and_their_cookie_fields_joined() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut browser = support::Browser::new();
    browser
        .get(&proxy.url(&format!("/?update={}", q(r#"{"h2":true}"#))))
        .await;
    let id = browser.cookie.clone().unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = Request::get(proxy.url("/h2"))
        .header("cookie", "a=1")
        .header("cookie", format!("session={id}"))
        .header("cookie", "b=2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["session"], serde_json::json!({"h2": true}));
    assert_eq!(seen["headers"]["cookie"], serde_json::json!(["a=1; b=2"]));
    assert_eq!(
        seen["headers"]["host"],
        serde_json::json!([proxy.addr.to_string()])
    );
    assert_eq!(seen["version"], "HTTP/1.1");
}

#[tokio::test]
async fn websocket_echoes_through_the_proxy_with_the_session_on_the_handshake() {
    let app = App::websocket().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let url = format!("ws://{}/ws?update={}", proxy.addr, q(r#"{"ws":1}"#));
    let (mut ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade through the proxy");
    let cookie = resp
        .headers()
        .get("set-cookie")
        .expect("update on the 101 applied")
        .to_str()
        .unwrap();
    let id = cookie.split(';').next().unwrap().to_string();
    let hello = ws.next().await.unwrap().unwrap();
    assert_eq!(hello.into_text().unwrap().as_str(), "session:e30=");
    for i in 0..3 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), format!("ping {i}"));
    }
    ws.close(None).await.ok();

    // A second handshake with the cookie carries the session.
    let mut req = format!("ws://{}/ws", proxy.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("cookie", HeaderValue::try_from(id).unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = ws.next().await.unwrap().unwrap();
    assert_eq!(
        hello.into_text().unwrap().as_str(),
        format!("session:{}", support::b64(r#"{"ws":1}"#))
    );
}

async fn problem(r: &support::Reply, status: u16) {
    assert_eq!(
        r.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let body = r.json();
    assert_eq!(body["status"], status);
    for field in ["type", "title", "detail"] {
        assert!(body[field].is_string(), "problem without {field}: {body}");
    }
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_problem() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = support::config(&format!("http://{closed}"));
    config.timeouts.upstream_connect = 1.0;
    let proxy = Proxy::start(config).await;
    let r = Client::new().get(&proxy.url("/"), &[]).await;
    problem(&r, 502).await;
    // The application's address is for the log, not for clients.
    let body = String::from_utf8_lossy(&r.body);
    assert!(!body.contains(&closed.port().to_string()), "{body}");
    assert!(body.contains("the proxy's log says why"), "{body}");
}

#[tokio::test]
async fn upstream_answering_garbage_is_a_502_problem() {
    let addr = raw_upstream("NOT HTTP AT ALL\r\n\r\n").await;
    let proxy = Proxy::start(support::config(&format!("http://{addr}"))).await;
    let r = Client::new().get(&proxy.url("/"), &[]).await;
    problem(&r, 502).await;
}

#[tokio::test]
async fn connections_the_upstream_closed_while_idle_are_not_used_again() {
    // An application that closes every keep-alive connection right after its answer.
    let (addr, accepted) = tcp_upstream(|mut s, accepted| async move {
        accepted.fetch_add(1, Ordering::SeqCst);
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(OK).await;
    })
    .await;
    let proxy = Proxy::start(support::config(&format!("http://{addr}"))).await;
    let client = Client::new();
    for round in 1..=3 {
        let r = client.get(&proxy.url("/"), &[]).await;
        assert_eq!(r.status, 200, "request {round}: {:?}", r.body);
        assert_eq!(&r.body[..], b"ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn slow_upstream_is_a_504_problem() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.timeouts.upstream_response = 0.3).await;
    let r = Client::new().get(&proxy.url("/?delay_ms=2000"), &[]).await;
    problem(&r, 504).await;
}

#[tokio::test]
async fn each_request_waits_for_the_application_within_its_own_timeout() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.timeouts.upstream_response = 0.5).await;
    let client = Client::new();
    // Quick and slow requests at once, with and without a body (the two ways out to the
    // application), started at different times: only the slow ones time out, each after
    // its own half second.
    let runs = (0..24u64).map(|i| {
        let client = &client;
        let proxy = &proxy;
        async move {
            tokio::time::sleep(Duration::from_millis(i * 15)).await;
            let delay = if i % 3 == 0 { 3_000 } else { 20 + i * 5 };
            let method = if i % 2 == 0 { "GET" } else { "POST" };
            let url = proxy.url(&format!("/?delay_ms={delay}"));
            let started = Instant::now();
            let r = client.request(method, &url, &[], Bytes::from("x")).await;
            (delay, method, r.status.as_u16(), started.elapsed())
        }
    });
    for (delay, method, status, took) in futures_util::future::join_all(runs).await {
        if delay > 500 {
            assert_eq!(status, 504, "{method} delayed {delay} ms");
            assert!(
                took >= Duration::from_millis(500),
                "{method}: 504 after {took:?}"
            );
            assert!(
                took < Duration::from_millis(2_500),
                "{method}: 504 after {took:?}"
            );
        } else {
            assert_eq!(status, 200, "{method} delayed {delay} ms");
        }
    }
    // After a quiet spell, a slow request still times out, and a quick one right after
    // a slow one does not.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = client.get(&proxy.url("/?delay_ms=3000"), &[]).await;
    assert_eq!(r.status, 504);
    let r = client.get(&proxy.url("/?delay_ms=10"), &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn oversized_request_head_is_a_431_problem() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.limits.max_header_bytes = 4096).await;
    let big = "v".repeat(5000);
    let r = Client::new().get(&proxy.url("/"), &[("x-big", &big)]).await;
    problem(&r, 431).await;
    let r = Client::new()
        .get(&proxy.url("/"), &[("x-small", "v")])
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn malformed_request_is_a_400() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
}

#[tokio::test]
async fn protocol_headers_in_the_application_trailers_never_reach_the_client() {
    // An application answering in chunks, with trailers: one of its own, the session
    // headers, which the client must not get there either, and fields about connections,
    // which an HTTP/2 client refuses (the whole response with them).
    let addr = raw_upstream(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
         trailer: x-checksum, x-session-update, x-session\r\n\r\n\
         2\r\nok\r\n0\r\nx-checksum: abc\r\nx-session-update: e30=\r\n\
         X-Session: eyJhIjoxfQ==\r\nconnection: keep-alive\r\n\
         transfer-encoding: chunked\r\ncontent-length: 99\r\nhost: evil.example\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(support::config(&format!("http://{addr}"))).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for _ in 0..2 {
        let req = Request::get(proxy.url("/t"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap();
        let trailers = body.trailers().cloned().expect("the trailers arrive");
        assert_eq!(body.to_bytes(), "ok");
        assert_eq!(trailers.get("x-checksum").unwrap(), "abc");
        assert!(trailers.get("x-session-update").is_none(), "{trailers:?}");
        assert!(trailers.get("x-session").is_none(), "{trailers:?}");
        assert!(trailers.get("connection").is_none(), "{trailers:?}");
        assert!(trailers.get("content-length").is_none(), "{trailers:?}");
        assert!(trailers.get("host").is_none(), "{trailers:?}");
    }
}

/// An application that answers every request it reads with `answer`, on connections it
/// keeps open.
async fn raw_upstream(answer: &'static str) -> std::net::SocketAddr {
    let (addr, _) = tcp_upstream(move |mut s, _| async move {
        let mut buf = [0u8; 8192];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    addr
}

/// A complete answer from a hand-written application.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// An application written by hand over TCP: `serve` runs for each connection it accepts,
/// with a counter shared with the test, which gets the address and the counter.
async fn tcp_upstream<F, Fut>(serve: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream, Arc<AtomicUsize>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = Arc::new(AtomicUsize::new(0));
    let shared = counter.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s, shared.clone()));
        }
    });
    (addr, counter)
}

#[tokio::test]
async fn upgrades_other_than_websocket_are_not_passed_on() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let r = Client::new()
        .get(
            &proxy.url("/"),
            &[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = r.json();
    for name in ["upgrade", "connection", "http2-settings"] {
        assert!(
            seen["headers"].get(name).is_none(),
            "{name} reached the app: {seen}"
        );
    }
    assert_eq!(seen["session"], serde_json::json!({}));
}

#[tokio::test]
async fn a_switch_of_protocols_the_client_did_not_ask_for_is_a_502() {
    // An application that switches to HTTP/2 on any request: through the tunnel a client
    // could send it headers the proxy never sees.
    let addr = raw_upstream(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
    )
    .await;
    let mut config = support::config(&format!("http://{addr}"));
    config.session.exclude = vec!["/static/**".into()];
    let proxy = Proxy::start(config).await;
    for path in ["/", "/static/a"] {
        for headers in [
            &[][..],
            &[("connection", "upgrade"), ("upgrade", "h2c")][..],
        ] {
            let r = Client::new().get(&proxy.url(path), headers).await;
            problem(&r, 502).await;
        }
    }
}

/// A 101 to a WebSocket handshake must complete it: `Upgrade: websocket` and the
/// `Sec-WebSocket-Accept` the client's key asks for. Any other 101 (from a route whose
/// status the client chooses, say) would open a tunnel to the application past the proxy.
#[tokio::test]
async fn a_switch_that_does_not_complete_the_websocket_handshake_is_a_502() {
    // The accept that answers the key below is `s3pPLMBiTxaQ9kYGzzhZRbK+xOo=`.
    for answer in [
        "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
         sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    ] {
        let addr = raw_upstream(answer).await;
        let mut config = support::config(&format!("http://{addr}"));
        config.session.exclude = vec!["/static/**".into()];
        let proxy = Proxy::start(config).await;
        for path in ["/?status=101", "/static/a?status=101"] {
            let r = Client::new()
                .get(
                    &proxy.url(path),
                    &[
                        ("connection", "upgrade"),
                        ("upgrade", "websocket"),
                        ("sec-websocket-version", "13"),
                        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    ],
                )
                .await;
            problem(&r, 502).await;
        }
    }
    // A client that sends no key cannot make the check go away: the answer's accept
    // cannot answer a key, so even a 101 that would do for a keyless check is refused.
    let addr = raw_upstream(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(support::config(&format!("http://{addr}"))).await;
    let r = Client::new()
        .get(
            &proxy.url("/?status=101"),
            &[("connection", "upgrade"), ("upgrade", "websocket")],
        )
        .await;
    problem(&r, 502).await;
}

#[tokio::test]
async fn websockets_work_on_excluded_paths_without_a_session() {
    let app = App::websocket().await;
    let proxy = Proxy::with(&app, |c| c.session.exclude = vec!["/live/**".into()]).await;
    let url = format!("ws://{}/live/feed?update={}", proxy.addr, q(r#"{"ws":1}"#));
    let (mut ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade through the proxy");
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "no session on an excluded path"
    );
    let hello = ws.next().await.unwrap().unwrap();
    assert_eq!(hello.into_text().unwrap().as_str(), "session:");
    ws.send(Message::text("ping")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "ping");
}

#[tokio::test]
async fn a_response_framed_both_ways_is_passed_on_chunked_whole() {
    let addr = raw_upstream(
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(support::config(&format!("http://{addr}"))).await;
    let client = Client::new();
    for _ in 0..2 {
        let r = client.get(&proxy.url("/"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.body[..], b"hello");
        assert_ne!(
            r.headers.get("content-length").map(|v| v.as_bytes()),
            Some(&b"3"[..])
        );
    }
}

#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused_both_ways() {
    let addr = raw_upstream(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(support::config(&format!("http://{addr}"))).await;
    let r = Client::new().get(&proxy.url("/"), &[]).await;
    problem(&r, 502).await;

    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: x\r\nconnection: close\r\ntransfer-encoding: gzip, chunked\r\n\r\n\
          2\r\nzz\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("application/problem+json"), "{text}");
    assert_eq!(
        app.connections.load(Ordering::SeqCst),
        0,
        "nothing reached the application"
    );
}

#[tokio::test]
async fn a_repeatable_request_lost_to_an_idle_close_is_sent_again() {
    // An application that answers the first request on each connection, then closes
    // the connection as the next one arrives, as one whose keep-alive timeout runs out
    // just then.
    let (addr, accepted) = tcp_upstream(|mut s, accepted| async move {
        accepted.fetch_add(1, Ordering::SeqCst);
        let mut buf = [0u8; 8192];
        if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
            let _ = s.write_all(OK).await;
        }
        let _ = s.read(&mut buf).await;
    })
    .await;
    let proxy = Proxy::start(support::config(&format!("http://{addr}"))).await;
    let client = Client::new();
    let r = client.get(&proxy.url("/"), &[]).await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = client.get(&proxy.url("/again"), &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(&r.body[..], b"ok");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "sent again on a new connection"
    );

    // A request with a body is not sent twice: the application may have acted on it.
    // (Requests with a body have connections of their own: the first opens one.)
    let r = client
        .request("POST", &proxy.url("/cart"), &[], Bytes::from_static(b"{}"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = client
        .request("POST", &proxy.url("/order"), &[], Bytes::from_static(b"{}"))
        .await;
    problem(&r, 502).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_400_not_a_502() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    for body in ["zz\r\nabc\r\n0\r\n\r\n", "-5\r\nabc\r\n0\r\n\r\n"] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = "POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
        s.write_all(format!("{head}{body}").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{body:?}: {text}");
    }
}

#[tokio::test]
async fn a_request_the_application_worked_on_before_closing_is_not_sent_again() {
    // An application that answers the first request on each connection; a later one it
    // works on for 300 ms, then closes without an answer (a worker killed by a timeout).
    let (addr, received) = tcp_upstream(|mut s, received| async move {
        let mut buf = [0u8; 8192];
        let mut first = true;
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
            received.fetch_add(1, Ordering::SeqCst);
            if !first {
                tokio::time::sleep(Duration::from_millis(300)).await;
                return;
            }
            first = false;
            let _ = s.write_all(OK).await;
        }
    })
    .await;
    let proxy = Proxy::start(support::config(&format!("http://{addr}"))).await;
    let client = Client::new();
    assert_eq!(client.get(&proxy.url("/"), &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = client.get(&proxy.url("/report"), &[]).await;
    problem(&r, 502).await;
    assert_eq!(
        received.load(Ordering::SeqCst),
        2,
        "the slow request arrived once"
    );
}
