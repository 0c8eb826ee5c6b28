//! Forwarding to the application: the connection pool, hop-by-hop headers,
//! `X-Forwarded-*`, and the upstream timeouts.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The body of every response the proxy sends: the upstream's, streamed, or one the
/// proxy wrote itself.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The upstream URL: `http://host:port` and an optional path prefix.
#[derive(Clone, Debug)]
pub struct UpstreamUrl {
    authority: Authority,
    /// Without a trailing slash; empty when there is none.
    prefix: String,
}

impl UpstreamUrl {
    pub fn parse(url: &str) -> Result<UpstreamUrl, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!(
                "`{url}` must start with http:// (the proxy speaks cleartext HTTP/1.1 to the application)"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{url}` must not carry user information"));
        }
        if uri.query().is_some() {
            return Err(format!("`{url}` must not have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl { authority, prefix })
    }

    /// The absolute URI the HTTP/1 client needs for a request to `path_and_query`.
    fn target(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = path_and_query.map_or("/", PathAndQuery::as_str);
        let pq = if self.prefix.is_empty() {
            PathAndQuery::try_from(pq)?
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.prefix))?
        };
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

/// Why forwarding failed: each answers the client differently.
#[derive(Debug)]
pub enum UpstreamError {
    /// Could not connect, or the connection broke before a response head (502).
    Unreachable(String),
    /// No response head within `timeouts.upstream_response` (504).
    Timeout,
    /// The request cannot be expressed towards the upstream (400).
    BadRequest(String),
}

/// The application behind the proxy, with a keep-alive connection pool.
#[derive(Clone)]
pub struct Upstream {
    url: UpstreamUrl,
    client: Client<HttpConnector, Incoming>,
    response_timeout: Duration,
}

impl Upstream {
    pub fn new(
        url: UpstreamUrl,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Upstream {
            url,
            client,
            response_timeout,
        }
    }

    /// Sends `req` to the application and returns its response head, the body still
    /// streaming. The caller has removed the request's hop-by-hop headers (before adding
    /// its own, which a client's `Connection` must not be able to name); the response's
    /// are removed here. `X-Forwarded-*` are added, `Host` is kept.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        client: &HeaderValue,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::try_from(a.as_str()).ok())
        });
        let target = self
            .url
            .target(req.uri().path_and_query())
            .map_err(|e| UpstreamError::BadRequest(e.to_string()))?;
        *req.uri_mut() = target;
        *req.version_mut() = Version::HTTP_11;

        let headers = req.headers_mut();
        if let Some(host) = host {
            headers.insert(header::HOST, host.clone());
            headers.insert(X_FORWARDED_HOST, host);
        }
        add_forwarded_for(headers, client);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));

        let sent = tokio::time::timeout(self.response_timeout, self.client.request(req)).await;
        let mut response = match sent {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(Err(e)) => return Err(UpstreamError::Unreachable(describe(&e))),
            Ok(Ok(response)) => response,
        };
        let switching = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        remove_hop_by_hop(response.headers_mut(), switching);
        Ok(response)
    }
}

fn describe(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn add_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    let previous = headers
        .get(X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty());
    let value = match previous {
        None => client.clone(),
        Some(previous) => {
            let mut joined = Vec::with_capacity(previous.len() + 2 + client.len());
            joined.extend_from_slice(previous.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| client.clone())
        }
    };
    headers.insert(X_FORWARDED_FOR, value);
}

/// The protocol a message asks to upgrade to (`Connection: upgrade` + `Upgrade: x`).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

/// Whether a header belongs to one connection only (RFC 9110 §7.6.1).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == header::PROXY_AUTHORIZATION
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), including every header
/// `Connection` names. With `keep_upgrade`, a message that asks for an upgrade keeps
/// `Upgrade` and `Connection: upgrade`, so that a WebSocket handshake passes.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one scan of the names is cheaper than a dozen removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let upgrade = if keep_upgrade {
        upgrade_protocol(headers)
    } else {
        None
    };
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::try_from(token.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP.iter() {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHORIZATION);
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url_keeps_its_prefix() {
        let u = UpstreamUrl::parse("http://127.0.0.1:3000/app/").unwrap();
        let pq = PathAndQuery::from_static("/x?y=1");
        assert_eq!(
            u.target(Some(&pq)).unwrap(),
            "http://127.0.0.1:3000/app/x?y=1"
        );
        assert!(UpstreamUrl::parse("https://a:1").is_err());
        assert!(UpstreamUrl::parse("http://u:p@a:1").is_err());
        assert!(UpstreamUrl::parse("nope").is_err());
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
