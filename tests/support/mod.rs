//! Test harness: a real upstream application, the real proxy, and an HTTP client, all
//! over loopback.
//!
//! The upstream ("the app") is scripted by the query string of each request, which the
//! proxy forwards unchanged: `?update=<json>` answers with `X-Session-Update`,
//! `?patch=<json>` with `X-Session-Patch`, `?rotate=1`, `?raw=<header value>` (an
//! update header sent verbatim), `?status=N`, `?cache=<Cache-Control>`,
//! `?cookie=<Set-Cookie>`, `?delay_ms=N`. Its body tells what it received: the decoded
//! session and every request header.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use session_proxy::config::Config;
use session_proxy::server::Server;
use session_proxy::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

pub type AppBody = BoxBody<Bytes, std::io::Error>;
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<AppBody>> + Send>>
        + Send
        + Sync,
>;

pub fn full(body: impl Into<Bytes>) -> AppBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn b64(json: &str) -> String {
    STANDARD.encode(json)
}

/// A real HTTP/1.1 server standing in for the application.
pub struct App {
    pub addr: SocketAddr,
    /// Connections the app accepted (to see the proxy's keep-alive pool at work).
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    /// The scripted app described in the module docs.
    pub async fn scripted() -> App {
        App::start(Arc::new(|req| Box::pin(scripted(req)))).await
    }

    pub async fn start(handler: Handler) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        App {
            addr,
            connections,
            task,
        }
    }

    /// An app that accepts WebSocket upgrades on any path: it greets with
    /// `session:<X-Session of the handshake>`, then echoes text messages. The 101 carries
    /// the session update `?update=<json>` asks for.
    pub async fn websocket() -> App {
        App::start(Arc::new(|mut req| {
            Box::pin(async move {
                let q = query(&req);
                let session = req.headers().get("x-session").cloned();
                let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                    return Response::new(full("not a websocket request"));
                };
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let mut ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    let hello = session
                        .map(|s| s.to_str().unwrap_or("").to_string())
                        .unwrap_or_default();
                    ws.send(Message::text(format!("session:{hello}")))
                        .await
                        .ok();
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_text() && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
                let accept = derive_accept_key(key.as_bytes());
                let mut r = Response::new(full(""));
                *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let h = r.headers_mut();
                h.insert("connection", HeaderValue::from_static("upgrade"));
                h.insert("upgrade", HeaderValue::from_static("websocket"));
                h.insert(
                    "sec-websocket-accept",
                    HeaderValue::try_from(accept).unwrap(),
                );
                if let Some(update) = q.get("update") {
                    h.insert(
                        "x-session-update",
                        HeaderValue::try_from(b64(update)).unwrap(),
                    );
                }
                r
            })
        }))
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Query parameters, percent-decoded.
pub fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned();
            (k.to_string(), v)
        })
        .collect()
}

/// The scripted app's handler, for apps that wrap it.
pub async fn scripted(req: Request<Incoming>) -> Response<AppBody> {
    let q = query(&req);
    if let Some(ms) = q.get("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let session = req
        .headers()
        .get("x-session")
        .map(|v| {
            let json = STANDARD.decode(v.as_bytes()).unwrap();
            serde_json::from_slice::<Value>(&json).unwrap()
        })
        .unwrap_or(Value::Null);
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let entry = headers
            .entry(name.as_str().to_string())
            .or_insert_with(|| Value::Array(vec![]));
        if let Value::Array(values) = entry {
            values.push(Value::String(
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ));
        }
    }
    let body = json!({
        "session": session,
        "path": req.uri().path(),
        "target": req.uri().to_string(),
        "headers": headers,
        "version": format!("{:?}", req.version()),
    });
    let mut response = Response::new(full(body.to_string()));
    let h = response.headers_mut();
    if let Some(update) = q.get("update") {
        h.insert(
            "x-session-update",
            HeaderValue::try_from(b64(update)).unwrap(),
        );
    }
    if let Some(patch) = q.get("patch") {
        h.insert(
            "x-session-patch",
            HeaderValue::try_from(b64(patch)).unwrap(),
        );
    }
    if let Some(raw) = q.get("raw") {
        h.append(
            "x-session-update",
            HeaderValue::try_from(raw.as_str()).unwrap(),
        );
    }
    if q.contains_key("rotate") {
        h.insert("x-session-rotate", HeaderValue::from_static("1"));
    }
    if let Some(cache) = q.get("cache") {
        h.insert(
            "cache-control",
            HeaderValue::try_from(cache.as_str()).unwrap(),
        );
    }
    if let Some(cookie) = q.get("cookie") {
        h.append(
            "set-cookie",
            HeaderValue::try_from(cookie.as_str()).unwrap(),
        );
    }
    if let Some(connection) = q.get("connection") {
        h.insert(
            "connection",
            HeaderValue::try_from(connection.as_str()).unwrap(),
        );
    }
    if let Some(status) = q.get("status").and_then(|s| s.parse().ok()) {
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
    }
    response
}

/// The real proxy, running in this process on loopback ports.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub shutdown: Arc<Shutdown>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A configuration for tests: ephemeral ports, the given upstream, and two worker
/// threads whatever the machine (many proxies run at once in one test process).
pub fn config(upstream: &str) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        upstream: upstream.to_string(),
        ..Config::default()
    };
    config.limits.workers = 2;
    config
}

impl Proxy {
    pub async fn start(config: Config) -> Proxy {
        config.validate().expect("test configuration is valid");
        let server = Server::bind(config).await.expect("proxy starts");
        let addr = server.local_addr().unwrap();
        let admin = server.admin_addr();
        let shutdown = server.shutdown_handle();
        let task = tokio::spawn(server.run());
        Proxy {
            addr,
            admin,
            shutdown,
            task,
        }
    }

    /// Waits until the server has finished (after `shutdown.begin_drain()`).
    pub async fn stopped(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// Proxy with the default config in front of `app`, changed by `tweak`.
    pub async fn with(app: &App, tweak: impl FnOnce(&mut Config)) -> Proxy {
        let mut c = config(&app.url());
        tweak(&mut c);
        Proxy::start(c).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request to the admin port, with `Authorization: Bearer <token>` when given.
    pub async fn admin_request(&self, method: &str, path: &str, token: Option<&str>) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let url = format!("http://{}{path}", self.admin.expect("admin port on"));
        Client::new()
            .request(method, &url, &headers, Bytes::new())
            .await
    }

    /// The value of a metric line from `/metrics` (first whose name and labels start
    /// with `prefix`), 0 when absent.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = get_text(&format!("http://{}/metrics", self.admin.unwrap())).await;
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Sends `request` as written on a new connection to `addr` and reads what comes back
/// until the connection closes (within 5 s), as text.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the connection closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn get_text(url: &str) -> String {
    let r = Client::new().request("GET", url, &[], Bytes::new()).await;
    String::from_utf8_lossy(&r.body).into_owned()
}

/// A finished response, body collected.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The session the app received, as JSON.
    pub fn session_seen(&self) -> Value {
        self.json()["session"].clone()
    }

    /// Values of a request header as the app received it.
    pub fn header_seen(&self, name: &str) -> Vec<String> {
        self.json()["headers"][name]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    /// The `Set-Cookie` for `name`, if any.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.set_cookies()
            .into_iter()
            .find(|c| c.starts_with(&format!("{name}=")))
    }

    /// The value the session cookie was set to (None when not set or cleared).
    pub fn session_cookie(&self) -> Option<String> {
        let c = self.cookie("session")?;
        let value = c.split(';').next()?.split_once('=')?.1.to_string();
        (!value.is_empty() && !c.contains("Max-Age=0")).then_some(value)
    }

    pub fn clears_session_cookie(&self) -> bool {
        self.cookie("session")
            .is_some_and(|c| c.starts_with("session=;") && c.contains("Max-Age=0"))
    }
}

/// An HTTP/1.1 client with a keep-alive pool.
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    pub fn new() -> Client {
        Client {
            inner: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .inner
            .request(req.body(Full::new(body)).unwrap())
            .await
            .expect("request sent");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.request("GET", url, headers, Bytes::new()).await
    }
}

/// A browser-like session: remembers the session cookie between requests.
pub struct Browser {
    pub client: Client,
    pub cookie: Option<String>,
}

impl Default for Browser {
    fn default() -> Self {
        Browser::new()
    }
}

impl Browser {
    pub fn new() -> Browser {
        Browser {
            client: Client::new(),
            cookie: None,
        }
    }

    /// A browser that already holds a session with `json`, created by the app through
    /// `proxy` with an `X-Session-Update`.
    pub async fn with_session(proxy: &Proxy, json: &str) -> Browser {
        let mut browser = Browser::new();
        browser
            .get(&proxy.url(&format!("/?update={}", q(json))))
            .await;
        assert!(browser.cookie.is_some(), "no session cookie for {json}");
        browser
    }

    pub async fn get(&mut self, url: &str) -> Reply {
        let cookie = self.cookie.as_ref().map(|c| format!("session={c}"));
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", c.as_str())).collect();
        let reply = self.client.get(url, &headers).await;
        if let Some(value) = reply.session_cookie() {
            self.cookie = Some(value);
        } else if reply.clears_session_cookie() {
            self.cookie = None;
        }
        reply
    }
}

/// Waits until something listens on `addr`; panics after 10 s.
pub async fn wait_for_listener(addr: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket through the proxy to `App::websocket`, its greeting read.
pub async fn websocket(
    proxy: &str,
) -> WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{proxy}/ws"))
        .await
        .expect("upgrade");
    let hello = ws.next().await.expect("greeting").expect("greeting");
    assert!(hello.into_text().unwrap().starts_with("session:"));
    ws
}

/// Percent-encodes a query value.
pub fn q(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}
