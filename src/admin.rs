//! The admin port, apart from the data plane: `/healthz`, `/readyz`, `/metrics`, and
//! `/sessions` (list and revoke a user's sessions).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::percent_decode_str;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// How long `/readyz` waits for the store before calling it unreachable.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks the store as `/readyz` does, and logs when its answer changes: a store that
/// goes away (or is not there at start-up) shows in the log, not only as a 503 from
/// `/readyz` that the orchestrator keeps to itself.
pub struct StoreHealth {
    store: Arc<dyn Store>,
    /// What the last check found: `UNKNOWN` before the first.
    state: AtomicU8,
    /// Whether `/readyz` is there (the admin port is on) to check again.
    probed: bool,
}

/// How often a store that did not answer at start-up is checked again when no `/readyz`
/// does it.
const UNPROBED_CHECK_EVERY: Duration = Duration::from_secs(5);

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl StoreHealth {
    pub fn new(store: Arc<dyn Store>, probed: bool) -> StoreHealth {
        StoreHealth {
            store,
            state: AtomicU8::new(UNKNOWN),
            probed,
        }
    }

    /// Checks the store at start-up; without an admin port, whose `/readyz` would check
    /// it again, goes on checking until it answers, so that its return is logged too.
    pub async fn check_at_start(&self) {
        if self.check().await.is_ok() || self.probed {
            return;
        }
        loop {
            tokio::time::sleep(UNPROBED_CHECK_EVERY).await;
            if self.check().await.is_ok() {
                return;
            }
        }
    }

    /// Whether the store answers now, and if not, why.
    pub async fn check(&self) -> Result<(), String> {
        let result = match tokio::time::timeout(READY_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("session store did not answer".to_string()),
        };
        let was = self
            .state
            .swap(if result.is_ok() { UP } else { DOWN }, Ordering::Relaxed);
        match (&result, was) {
            (Err(why), UNKNOWN | UP) if self.probed => tracing::warn!(
                "{why}: /readyz answers 503, and requests with a session get 503, until it answers"
            ),
            (Err(why), UNKNOWN | UP) => {
                tracing::warn!("{why}: requests with a session get 503 until it answers")
            }
            (Ok(()), DOWN) => tracing::info!("the session store answers again: ready"),
            _ => {}
        }
        result
    }
}

/// The admin server's shared state.
#[derive(Clone)]
pub struct Admin {
    store: Arc<dyn Store>,
    health: Arc<StoreHealth>,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
    token: Option<Arc<str>>,
    user_index: bool,
}

type AdminResponse = Response<Full<Bytes>>;

impl Admin {
    pub fn new(
        health: Arc<StoreHealth>,
        metrics: Arc<Metrics>,
        shutdown: Arc<Shutdown>,
        config: &Config,
    ) -> Admin {
        Admin {
            store: health.store.clone(),
            health,
            metrics,
            shutdown,
            token: config.admin_token.as_deref().map(Arc::from),
            user_index: config.session.user_key.is_some(),
        }
    }

    /// Serves the admin port until the process ends (it stays up while the proxy
    /// drains, so probes see `/readyz` turn 503).
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.route(req).await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn route(&self, req: Request<Incoming>) -> AdminResponse {
        let path = req.uri().path();
        let probe = path == "/healthz" || path == "/readyz" || path == "/metrics";
        // HEAD answers like GET; hyper sends no body for it.
        if probe && req.method() != Method::GET && req.method() != Method::HEAD {
            return not_allowed("GET, HEAD");
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.ready().await,
            "/metrics" => {
                // OpenMetrics for a scraper that asks for it (Prometheus does), else the
                // Prometheus text format.
                let open_metrics = prefers_open_metrics(req.headers().get_all(ACCEPT));
                let body = self.metrics.render_as(&self.store, open_metrics);
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(if open_metrics {
                        "application/openmetrics-text; version=1.0.0; charset=utf-8"
                    } else {
                        "text/plain; version=0.0.4; charset=utf-8"
                    }),
                );
                r
            }
            _ if path == "/sessions" || path.starts_with("/sessions/") => {
                // With a token, a page has no way in: it does not have the token.
                if self.token.is_none() && from_a_browser(&req) {
                    return problem(
                        StatusCode::FORBIDDEN,
                        "the admin API is not for browsers: requests with Origin or \
                         Sec-Fetch-* headers are refused (use the sessions command or curl)",
                    );
                }
                // Without a token, a page that rebinds its own host name to this address
                // could still read a listing over plain http (no `Sec-Fetch-*` there, no
                // `Origin` on a GET): such a request names the port by that host name.
                if self.token.is_none() && named_by_host_name(&req) {
                    return problem(
                        StatusCode::FORBIDDEN,
                        "without admin_token, /sessions answers only requests addressed to \
                         an IP address or localhost (Host); set admin_token to reach it by \
                         a host name",
                    );
                }
                if let Err(why) = self.authorized(&req) {
                    let mut r = problem(StatusCode::UNAUTHORIZED, why);
                    r.headers_mut()
                        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    return r;
                }
                if !self.user_index {
                    return problem(
                        StatusCode::NOT_FOUND,
                        "the per-user index is off: set session.user_key",
                    );
                }
                self.sessions(&req).await
            }
            _ => problem(StatusCode::NOT_FOUND, "no such admin endpoint"),
        }
    }

    async fn ready(&self) -> AdminResponse {
        if self.shutdown.is_draining() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
        }
        match self.health.check().await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        }
    }

    /// `Ok` when no `admin_token` is set or the request carries it; else why not.
    fn authorized(&self, req: &Request<Incoming>) -> Result<(), &'static str> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        // The scheme's name is case-insensitive (RFC 9110 §11.1).
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start());
        match presented {
            Some(presented) if constant_time_eq(presented.as_bytes(), token.as_bytes()) => Ok(()),
            // The token sent is never repeated: the answer may end up in a log.
            Some(_) => Err("wrong admin token: the Bearer token sent is not admin_token"),
            None => Err("admin_token required: send Authorization: Bearer <token>"),
        }
    }

    async fn sessions(&self, req: &Request<Incoming>) -> AdminResponse {
        let path = req.uri().path();
        if let Some(handle) = path.strip_prefix("/sessions/") {
            if req.method() != Method::DELETE {
                return not_allowed("DELETE");
            }
            let Some(handle) = decode(handle) else {
                return problem(StatusCode::BAD_REQUEST, NOT_ENCODED);
            };
            return match self.store.revoke_handle(&handle).await {
                Ok(true) => json_response(StatusCode::OK, json!({"revoked": 1})),
                Ok(false) => problem(StatusCode::NOT_FOUND, "no live session has this handle"),
                Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            };
        }
        let user = match query_param(req.uri().query().unwrap_or(""), "user") {
            Ok(Some(user)) => user,
            Ok(None) => return problem(StatusCode::BAD_REQUEST, "name the user: /sessions?user=U"),
            Err(()) => return problem(StatusCode::BAD_REQUEST, NOT_ENCODED),
        };
        match *req.method() {
            Method::GET => match self.store.user_sessions(&user).await {
                Ok(sessions) => {
                    json_response(StatusCode::OK, json!({"user": user, "sessions": sessions}))
                }
                Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            },
            Method::DELETE => match self.store.revoke_user(&user).await {
                Ok(n) => json_response(StatusCode::OK, json!({"user": user, "revoked": n})),
                Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            },
            _ => not_allowed("GET, DELETE"),
        }
    }
}

/// Whether a request comes from a web page: browsers send `Origin` on cross-site and
/// non-GET requests and `Sec-Fetch-*` on all of them, and a page cannot remove either;
/// the sessions command and curl send none. Without `admin_token`, a page that rebinds
/// its own host name to an operator's loopback address (DNS rebinding) could otherwise
/// list and revoke sessions, whatever `Host` it sends.
///
/// `Sec-Fetch-Mode` alone does not count: Node's `fetch` sends it on every request, and
/// browsers send it only together with `Sec-Fetch-Site`.
fn from_a_browser(req: &Request<Incoming>) -> bool {
    let headers = req.headers();
    headers.contains_key(ORIGIN) || headers.contains_key("sec-fetch-site")
}

/// Whether the request names the admin port by a host name (its `Host`, or the
/// authority of its target), not by an IP address or `localhost`.
fn named_by_host_name(req: &Request<Incoming>) -> bool {
    let host = match req.headers().get(HOST) {
        Some(host) => host.to_str().unwrap_or("?"),
        None => match req.uri().authority() {
            Some(authority) => authority.as_str(),
            // HTTP/1.0 without a Host: no browser sends that.
            None => return false,
        },
    };
    if host.starts_with('[') {
        return false;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    !(name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const NOT_ENCODED: &str = "users and handles must be UTF-8, percent-encoded (%XX) where needed";

/// The decoded value of `name` in a query string (`+` is a space); `Err` when it is not
/// percent-encoded UTF-8, which must not be taken for another name.
fn query_param(query: &str, name: &str) -> Result<Option<String>, ()> {
    let Some(value) = query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then_some(v)
    }) else {
        return Ok(None);
    };
    let value = decode(&value.replace('+', " ")).ok_or(())?;
    Ok(Some(value).filter(|v| !v.is_empty()))
}

/// Percent-decodes `text`: `None` if a `%` is not followed by two hex digits or the
/// result is not UTF-8.
fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let escapes_ok = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, body: serde_json::Value) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// 405, with the methods the resource takes.
fn not_allowed(allow: &'static str) -> AdminResponse {
    let mut r = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("this resource takes {allow}"),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

fn problem(status: StatusCode, detail: &str) -> AdminResponse {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut r = json_response(status, body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

/// Whether an `Accept` header prefers OpenMetrics to Prometheus's text format. Each takes
/// the weight of the most specific range that names it (RFC 9110 §12.5.1): its own type,
/// else `application/*` or `text/*`, else `*/*`; a range whose weight is not a number
/// from 0 to 1 is left out. OpenMetrics needs a weight above 0 and above the text
/// format's, so that `*/*` alone, or no `Accept` at all, gets the text format every
/// scraper reads.
fn prefers_open_metrics(accept: http::header::GetAll<'_, HeaderValue>) -> bool {
    // Most specific first: the type itself, its type's wildcard, `*/*`.
    let (mut open, mut text) = ([None::<f32>; 3], [None::<f32>; 3]);
    let ranges = accept
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';');
        let kind = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let q = match parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
        {
            None => 1.0,
            Some((_, v)) => match v.trim().parse::<f32>() {
                Ok(q) if (0.0..=1.0).contains(&q) => q,
                _ => continue,
            },
        };
        let weigh = |slot: &mut Option<f32>| *slot = Some(slot.map_or(q, |w| w.max(q)));
        match kind.as_str() {
            "application/openmetrics-text" => weigh(&mut open[0]),
            "application/*" => weigh(&mut open[1]),
            "text/plain" => weigh(&mut text[0]),
            "text/*" => weigh(&mut text[1]),
            "*/*" => {
                weigh(&mut open[2]);
                weigh(&mut text[2]);
            }
            _ => {}
        }
    }
    let weight = |ranks: [Option<f32>; 3]| ranks.into_iter().flatten().next().unwrap_or(0.0);
    let (open, text) = (weight(open), weight(text));
    open > 0.0 && open > text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefers(accept: &[&str]) -> bool {
        let mut headers = http::HeaderMap::new();
        for v in accept {
            headers.append(ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        prefers_open_metrics(headers.get_all(ACCEPT))
    }

    #[test]
    fn open_metrics_only_when_the_scraper_prefers_it() {
        // What Prometheus sends.
        assert!(prefers(&[
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ]));
        assert!(prefers(&["Application/OpenMetrics-Text"]));
        assert!(prefers(&[
            "text/html",
            "application/openmetrics-text; q=0.3"
        ]));
        assert!(!prefers(&[]));
        assert!(!prefers(&["*/*"]));
        assert!(!prefers(&["application/openmetrics-text;q=0"]));
        assert!(!prefers(&[
            "application/openmetrics-text;q=0.0, text/plain"
        ]));
        assert!(!prefers(&[
            "text/plain, application/openmetrics-text;q=0.9"
        ]));
        assert!(!prefers(&["application/openmetrics-text;q=oops"]));
        assert!(!prefers(&["application/openmetrics-textual"]));
        assert!(!prefers(&["application/openmetrics-text;q=0.1, */*;q=0.9"]));
        assert!(!prefers(&["application/openmetrics-text;q=0.5", "text/*"]));
        assert!(prefers(&["application/openmetrics-text, */*;q=0.1"]));
        // The most specific range decides, whatever a wildcard says.
        assert!(prefers(&[
            "application/openmetrics-text;q=0.5, text/plain;q=0.1, */*"
        ]));
        assert!(prefers(&["text/plain;q=0, */*"]));
        assert!(!prefers(&["application/openmetrics-text, text/plain"]));
        // Weights that are not numbers from 0 to 1 count for nothing.
        assert!(!prefers(&[
            "application/openmetrics-text;q=2, text/plain;q=0.5"
        ]));
        assert!(!prefers(&["application/openmetrics-text;q=inf"]));
        assert!(!prefers(&["application/openmetrics-text;q=NaN"]));
    }
}
