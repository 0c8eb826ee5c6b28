//! Forwarding to the application: the connection pool, hop-by-hop headers,
//! `X-Forwarded-*`, and the upstream timeouts.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;

use crate::http1::client::{self, Failure};
use crate::server::current_worker;

/// The body of every response the proxy sends: the upstream's, streamed, or one the
/// proxy wrote itself.
pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;

/// The upstream URL: `http://host:port` and an optional path prefix.
#[derive(Clone, Debug)]
pub struct UpstreamUrl {
    authority: Authority,
    /// `host:port`, the port defaulting to 80, as connecting needs it.
    address: String,
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
        if uri.query().is_some() || url.contains('#') {
            return Err(format!("`{url}` must not have a query or a fragment"));
        }
        // What follows the host: nothing (port 80), or `:` and a port. A port that does
        // not parse must not fall back to 80 and send the sessions somewhere else.
        let after_host = authority
            .as_str()
            .get(authority.host().len()..)
            .unwrap_or_default();
        let port = match after_host.strip_prefix(':') {
            None if after_host.is_empty() => 80,
            Some(digits) => match digits.parse::<u16>() {
                Ok(port) if port != 0 && digits.bytes().all(|b| b.is_ascii_digit()) => port,
                _ => return Err(format!("`{url}` has no valid port (1–65535)")),
            },
            None => return Err(format!("`{url}` has no valid host")),
        };
        let address = format!("{}:{port}", authority.host());
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            authority,
            address,
            prefix,
        })
    }

    /// The request target (origin form) for a request to `path_and_query`.
    fn target(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = path_and_query.map_or("/", PathAndQuery::as_str);
        // `OPTIONS *` asks about the server, whatever the prefix.
        if pq == "*" {
            return Ok(Uri::from_static("*"));
        }
        if self.prefix.is_empty() {
            return match path_and_query {
                Some(pq) => Ok(Uri::from(pq.clone())),
                None => Ok(Uri::from_static("/")),
            };
        }
        Ok(Uri::from(PathAndQuery::try_from(format!(
            "{}{pq}",
            self.prefix
        ))?))
    }
}

/// Why forwarding failed: each answers the client differently.
#[derive(Debug)]
pub enum UpstreamError {
    /// Could not connect, or the connection broke before a response head (502).
    Unreachable(String),
    /// No response head within `timeouts.upstream_response` (504).
    Timeout,
    /// The request cannot be expressed towards the upstream, or its body broke off or was
    /// malformed (400).
    BadRequest(String),
    /// The response cannot be passed on to the client (502).
    Invalid(String),
    /// The client paused its request body for longer than `timeouts.client_body` (408).
    BodyPaused(String),
}

/// Why a [`Paced`] body failed: told apart from other body errors by its type.
#[derive(Debug)]
pub struct BodyPaused(Duration);

impl std::fmt::Display for BodyPaused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client sent no byte of its request body for {:?} (timeouts.client_body)",
            self.0
        )
    }
}

impl std::error::Error for BodyPaused {}

/// The [`BodyPaused`] among an error's causes, if any.
fn paused<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyPaused> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(paused) = e.downcast_ref::<BodyPaused>() {
            return Some(paused);
        }
        cause = e.source();
    }
    None
}

/// A request's body: the one hyper reads from the client, or none (a request the proxy's
/// own HTTP/1.1 read, or one sent again).
pub type ClientBody = Either<Paced<Incoming>, Empty<Bytes>>;

/// A client's request body that may pause at most `gap` between frames: past that it
/// fails, which cuts the request off towards the application (like nginx's
/// `client_body_timeout`). Without it, a client that stops in the middle of an upload
/// would hold its connection, and one to the application, for as long as it liked.
pub struct Paced<B> {
    inner: B,
    gap: Duration,
    /// Armed while the body waits for its next frame.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since `pause` was armed: it restarts from now.
    moved: bool,
}

impl<B> Paced<B> {
    pub fn new(inner: B, gap: Duration) -> Paced<B> {
        Paced {
            inner,
            gap,
            pause: None,
            moved: false,
        }
    }
}

impl<B> Body for Paced<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.moved = true;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = tokio::time::Instant::now() + this.gap;
        let pause = match &mut this.pause {
            Some(pause) => {
                if std::mem::take(&mut this.moved) {
                    pause.as_mut().reset(deadline);
                }
                pause
            }
            None => this
                .pause
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        ready!(pause.as_mut().poll(cx));
        Poll::Ready(Some(Err(Box::new(BodyPaused(this.gap)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// What it takes to send a bodiless request again: its head, and when it was sent.
struct Replay {
    head: Option<http::request::Parts>,
    sent: Instant,
}

impl Replay {
    /// Only for a method that means the same when sent twice (RFC 9110 §9.2.2), and a
    /// request without a body.
    fn of(req: &Request<ClientBody>) -> Option<Replay> {
        let repeatable = req.method().is_idempotent()
            && match req.body() {
                Either::Left(body) => body.is_end_stream(),
                Either::Right(_) => true,
            };
        repeatable.then(|| {
            let mut head = Request::new(());
            *head.method_mut() = req.method().clone();
            *head.uri_mut() = req.uri().clone();
            *head.version_mut() = req.version();
            *head.headers_mut() = req.headers().clone();
            Replay {
                head: Some(head.into_parts().0),
                sent: Instant::now(),
            }
        })
    }

    /// The request once more, if `failure` says the connection closed before any answer,
    /// at once (the application closing an idle connection as the request arrived, not
    /// one that worked on it and then failed), and it has not been sent again yet.
    fn again(&mut self, failure: &hyper::Error) -> Option<Request<ClientBody>> {
        if !(failure.is_incomplete_message() || connection_reset(failure))
            || self.sent.elapsed() > REPLAY_WITHIN
        {
            return None;
        }
        let head = self.head.take()?;
        Some(Request::from_parts(head, Either::Right(Empty::new())))
    }
}

fn connection_reset(e: &hyper::Error) -> bool {
    use std::error::Error;
    e.source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            )
        })
}

/// The application behind the proxy, with a keep-alive connection pool.
#[derive(Clone)]
pub struct Upstream {
    url: UpstreamUrl,
    pools: Arc<Pools>,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// The longest response head taken from the application.
    max_head: usize,
    /// The protocol headers: the proxy reads them from the response even when its
    /// `Connection` names them (they are meant for the proxy, the next hop, after all).
    spared: Arc<[HeaderName]>,
    /// `trust_forwarded`: a request's `X-Forwarded-Proto` and `-Host` come from a proxy
    /// of the operator's, and are kept.
    trust_forwarded: bool,
}

impl Upstream {
    /// Must be called inside the runtime: it starts the task that closes idle
    /// connections. Each of the `workers` threads gets connections of its own.
    /// `hidden` names response fields the client must never get: they are removed from
    /// the application's trailers here (the caller takes them out of the head, and reads
    /// them first: a response's `Connection` cannot make them vanish before that).
    /// A response head may be `max_head` bytes long.
    pub fn new(
        url: UpstreamUrl,
        connect_timeout: Duration,
        response_timeout: Duration,
        workers: usize,
        hidden: Vec<HeaderName>,
        max_head: usize,
    ) -> Upstream {
        let spared: Arc<[HeaderName]> = hidden.clone().into();
        // Fields that are about a connection, not a message, have no place in trailers
        // either: HTTP/2 clients refuse a response whose trailers carry one. Nor do the
        // fields that frame or route a message (RFC 9110 §6.5.1): an HTTP/2 client takes
        // a `Content-Length` trailer for a protocol error and loses the whole answer.
        let mut hidden = hidden;
        hidden.extend(
            [
                "connection",
                "keep-alive",
                "proxy-connection",
                "transfer-encoding",
                "upgrade",
                "te",
                "trailer",
                "content-length",
                "host",
            ]
            .map(HeaderName::from_static),
        );
        let pools = Arc::new(Pools {
            hyper: Pool::new(workers),
            lean: Pool::new(workers),
            hidden: hidden.into(),
        });
        tokio::spawn(close_idle_connections(Arc::downgrade(&pools)));
        Upstream {
            url,
            pools,
            connect_timeout,
            response_timeout,
            max_head,
            spared,
            trust_forwarded: false,
        }
    }

    /// Keeps the `X-Forwarded-Proto` and `X-Forwarded-Host` a request arrives with
    /// (`trust_forwarded`), setting them only when it has none.
    pub fn trusting_forwarded(self, trust_forwarded: bool) -> Upstream {
        Upstream {
            trust_forwarded,
            ..self
        }
    }

    /// Sends `req` to the application and returns its response head, the body still
    /// streaming. The caller has removed the request's hop-by-hop headers (before adding
    /// its own, which a client's `Connection` must not be able to name); the response's
    /// are removed here. `X-Forwarded-*` are added, `Host` is kept.
    pub async fn forward(
        &self,
        mut req: Request<ClientBody>,
        client: &HeaderValue,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        // The target's own authority, when it has one, wins over `Host`: an absolute-form
        // target's (RFC 9112 §3.2.2) or an HTTP/2 client's `:authority` (RFC 9113
        // §8.3.1), without user information.
        let authority = req.uri().authority().and_then(|a| {
            let host = a
                .as_str()
                .rsplit_once('@')
                .map_or(a.as_str(), |(_, host)| host);
            HeaderValue::try_from(host).ok()
        });
        let from_target = authority.is_some();
        let host = authority.or_else(|| req.headers().get(header::HOST).cloned());
        let target = self
            .url
            .target(req.uri().path_and_query())
            .map_err(|e| UpstreamError::BadRequest(e.to_string()))?;
        *req.uri_mut() = target;
        *req.version_mut() = Version::HTTP_11;

        let headers = req.headers_mut();
        match host {
            Some(host) => {
                if from_target {
                    headers.insert(header::HOST, host.clone());
                }
                if !(self.trust_forwarded && headers.contains_key(X_FORWARDED_HOST)) {
                    headers.insert(X_FORWARDED_HOST, host);
                }
            }
            // HTTP/1.1 requires a Host: an HTTP/1.0 client may not have sent one.
            None => {
                if let Ok(upstream) = HeaderValue::try_from(self.url.authority.as_str()) {
                    headers.insert(header::HOST, upstream);
                }
            }
        }
        add_forwarded_for(headers, client);
        if !(self.trust_forwarded && headers.contains_key(X_FORWARDED_PROTO)) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }

        // The common case, a request without a body that asks for no upgrade, goes out
        // through the proxy's own HTTP/1.1; the rest through hyper's.
        let lean = req.body().is_end_stream() && !headers_ask_upgrade(req.headers());
        // hyper sends a `GET` or `HEAD` body of unknown length (chunked from the client, or
        // HTTP/2 data without a length) as no body at all unless the framing is asked for.
        if !lean
            && matches!(*req.method(), Method::GET | Method::HEAD)
            && req.body().size_hint().exact().is_none()
        {
            req.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let sent = if lean {
            tokio::time::timeout(self.response_timeout, self.send_lean(req)).await
        } else {
            tokio::time::timeout(self.response_timeout, self.send(req)).await
        };
        let mut response = match sent {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(result) => result?,
        };
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        remove_hop_by_hop(response.headers_mut(), switching, &self.spared)
            .map_err(|e| UpstreamError::Invalid(format!("the application's response: {e}")))?;
        let status = response.status();
        // A 1xx or 204 has no body, whatever its length says, and loses its length.
        if status.is_informational() || status == StatusCode::NO_CONTENT {
            response.headers_mut().remove(header::CONTENT_LENGTH);
        } else {
            single_content_length(response.headers_mut()).map_err(|e| {
                UpstreamError::Invalid(format!("the application's response has {e}"))
            })?;
        }
        Ok(response)
    }

    /// Sends on an idle pooled connection, or a new one.
    ///
    /// An application closes a keep-alive connection it has not heard from for a while
    /// (Node.js after 5 s, gunicorn after 2 s), and a request sent just then is lost with
    /// it. So a request that meets a pooled connection the application has just closed,
    /// and was not sent, goes to the next one; and a request that can be repeated (a
    /// method that means the same when sent twice, no body) sent on a connection that sat
    /// idle for a while goes once more on a new connection if the old one closed right
    /// after it was sent, before any answer. (One that closes later was closed by an
    /// application that had worked on the request: that is its answer.)
    async fn send(
        &self,
        mut req: Request<ClientBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut replay = None;
        loop {
            let (mut sender, idle_for) = match self.pools.hyper.take() {
                Some((sender, idle_for)) => (sender, Some(idle_for)),
                None => (self.connect().await?, None),
            };
            let pooled = idle_for.is_some();
            // A connection is pooled once its last response body has been read: it is
            // ready, or about to be, or closing.
            if pooled && !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            if idle_for.is_some_and(|idle| idle >= REPLAY_AFTER_IDLE) && replay.is_none() {
                replay = Replay::of(&req);
            }
            let head_request = req.method() == Method::HEAD;
            match sender.try_send_request(req).await {
                Ok(response) => {
                    // An upgraded connection belongs to its tunnel from now on; one whose
                    // answer has no body by rule but announces one is not trusted with
                    // another request (see `announces_body`).
                    let status = response.status();
                    let reuse = status != StatusCode::SWITCHING_PROTOCOLS
                        && !((head_request
                            || status == StatusCode::NO_CONTENT
                            || status == StatusCode::NOT_MODIFIED)
                            && crate::http1::announces_body(response.headers()));
                    let body = |body| UpstreamBody {
                        inner: Inner::Hyper {
                            body,
                            reuse: reuse.then_some(sender),
                        },
                        pools: self.pools.clone(),
                    };
                    return Ok(response.map(body));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => match replay.as_mut().and_then(|r| r.again(e.error())) {
                        Some(again) => req = again,
                        None if paused(e.error()).is_some() => {
                            let why = paused(e.error()).map(ToString::to_string);
                            return Err(UpstreamError::BodyPaused(why.unwrap_or_default()));
                        }
                        // The client's body broke off or was malformed.
                        None if e.error().is_user() => {
                            return Err(UpstreamError::BadRequest(describe(e.error())));
                        }
                        None => return Err(UpstreamError::Unreachable(describe(e.error()))),
                    },
                },
            }
        }
    }

    /// Sends a request without a body through the proxy's own HTTP/1.1, on an idle
    /// pooled connection or a new one. What [`Upstream::send`] says of connections the
    /// application closes holds here too: a request whose pooled connection turns out
    /// closed before it was written goes to the next one, and a repeatable one whose
    /// connection had been idle and closed right after it was sent, before any answer,
    /// goes once more on a new connection.
    async fn send_lean(
        &self,
        req: Request<ClientBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let head = req.into_parts().0;
        let mut may_replay = head.method.is_idempotent();
        let mut fresh = None;
        loop {
            let (conn, idle_for) = match fresh.take() {
                Some(conn) => (conn, None),
                None => match self.pools.lean.take() {
                    Some((conn, idle_for)) => (conn, Some(idle_for)),
                    None => (client::Conn::new(self.open().await?, self.max_head), None),
                },
            };
            let sent = Instant::now();
            let failure = match conn.exchange(&head).await {
                Ok((parts, reader)) => {
                    let body = UpstreamBody {
                        inner: Inner::Lean(reader),
                        pools: self.pools.clone(),
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(failure) => failure,
            };
            match failure {
                Failure::Unsent(_) if idle_for.is_some() => continue,
                Failure::Closed(_)
                    if may_replay
                        && idle_for.is_some_and(|idle| idle >= REPLAY_AFTER_IDLE)
                        && sent.elapsed() <= REPLAY_WITHIN =>
                {
                    may_replay = false;
                    // On a new connection: the pool's others idled as long.
                    fresh = Some(client::Conn::new(self.open().await?, self.max_head));
                }
                Failure::Unsent(why) | Failure::Closed(why) | Failure::Broken(why) => {
                    return Err(UpstreamError::Unreachable(why));
                }
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<ClientBody>, UpstreamError> {
        let stream = self.open().await?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(self.max_head)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Unreachable(describe(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("upstream connection ended: {}", describe(&e));
            }
        });
        Ok(sender)
    }

    /// A new TCP connection to the application.
    async fn open(&self) -> Result<TcpStream, UpstreamError> {
        let address = &self.url.address;
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| {
                UpstreamError::Unreachable(format!(
                    "connecting to {address} took longer than {:?}",
                    self.connect_timeout
                ))
            })?
            .map_err(|e| UpstreamError::Unreachable(format!("cannot connect to {address}: {e}")))?;
        // Each request is written in one go: nothing to gain from delaying small writes.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Idle keep-alive connections to the application: hyper's, for requests with a body or
/// an upgrade, and the proxy's own for the rest. Trailers of either lose `hidden`.
struct Pools {
    hyper: Pool<SendRequest<ClientBody>>,
    lean: Pool<client::Conn>,
    hidden: Box<[HeaderName]>,
}

/// A connection that can wait in a [`Pool`].
trait Reusable {
    /// Whether the application has closed it (as far as can be told without waiting).
    fn is_closed(&self) -> bool;
}

impl Reusable for SendRequest<ClientBody> {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }
}

impl Reusable for client::Conn {
    fn is_closed(&self) -> bool {
        client::Conn::is_closed(self)
    }
}

/// Idle connections, most recently used last. Each worker thread has its own, since a
/// connection is driven by the thread that opened it; one more serves any other thread.
struct Pool<C> {
    idle: Box<[Mutex<Vec<Idle<C>>>]>,
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

/// At most this many idle connections are kept per thread; more are closed.
const MAX_IDLE: usize = 1024;
/// An idle connection is closed after 45 s unused, or within a second of the application
/// closing it: nothing else reads a pooled connection of the proxy's own, which would
/// otherwise hold its socket (in `CLOSE_WAIT`) until it was taken.
const IDLE_TICK: Duration = Duration::from_secs(1);
const IDLE_MAX: Duration = Duration::from_secs(45);
/// A request sent on a connection idle this long may meet the application closing it,
/// and is kept so that it can be sent again (see [`Upstream::send`]).
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);
/// ... and is sent again only if the connection failed this soon after it was sent.
const REPLAY_WITHIN: Duration = Duration::from_millis(100);
/// How long a hyper connection whose answer has ended may take to be ready for the next
/// request before it is closed instead of pooled (see `UpstreamBody::release`).
const READY_WITHIN: Duration = Duration::from_millis(250);

impl<C: Reusable> Pool<C> {
    fn new(workers: usize) -> Pool<C> {
        Pool {
            idle: (0..=workers).map(|_| Mutex::default()).collect(),
        }
    }

    /// This thread's idle connections.
    fn here(&self) -> std::sync::MutexGuard<'_, Vec<Idle<C>>> {
        let last = self.idle.len() - 1;
        let slot = current_worker().map_or(last, |w| w.min(last));
        self.idle[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection of this thread, and how long it was idle.
    fn take(&self) -> Option<(C, Duration)> {
        let mut idle = self.here();
        while let Some(Idle { conn, since }) = idle.pop() {
            if !conn.is_closed() {
                return Some((conn, since.elapsed()));
            }
        }
        None
    }

    /// Keeps a connection for the next request (one the application closed meanwhile is
    /// skipped when taken, or closed by the sweep).
    fn put(&self, conn: C) {
        let since = Instant::now();
        let mut idle = self.here();
        if idle.len() < MAX_IDLE {
            idle.push(Idle { conn, since });
        }
    }

    /// Closes the connections idle too long, or closed by the application.
    fn close_idle(&self) {
        for slot in &self.idle {
            let expired: Vec<Idle<C>> = {
                let mut idle = slot.lock().unwrap_or_else(PoisonError::into_inner);
                let (expired, kept) = std::mem::take(&mut *idle)
                    .into_iter()
                    .partition(|i| i.since.elapsed() > IDLE_MAX || i.conn.is_closed());
                *idle = kept;
                expired
            };
            drop(expired);
        }
    }
}

/// Closes connections idle too long or closed by the application (dropping the last
/// sender ends an idle hyper connection), until the pools are gone.
async fn close_idle_connections(pools: Weak<Pools>) {
    let mut interval = tokio::time::interval(IDLE_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(pools) = pools.upgrade() else { return };
        pools.hyper.close_idle();
        pools.lean.close_idle();
    }
}

/// The application's response body, streamed to the client. Once it has been read to
/// the end its connection goes back to the pool; a body dropped before its end takes
/// its connection with it (HTTP/1.1 cannot skip the rest). Trailers lose the pools'
/// hidden fields.
pub struct UpstreamBody {
    inner: Inner,
    pools: Arc<Pools>,
}

enum Inner {
    Hyper {
        body: Incoming,
        /// The connection the body arrives on, while it can be reused.
        reuse: Option<SendRequest<ClientBody>>,
    },
    Lean(client::Reader),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl UpstreamBody {
    fn release(&mut self) {
        match &mut self.inner {
            Inner::Hyper { reuse, .. } => {
                let Some(mut sender) = reuse.take() else {
                    return;
                };
                if sender.is_ready() {
                    self.pools.hyper.put(sender);
                    return;
                }
                // Not ready yet: about to be (its connection task has not seen the end of
                // the answer yet), or still sending a request body the application answered
                // without reading. Handed to another request, the latter would keep it
                // waiting behind that body: such a connection is pooled only once ready,
                // if that is soon, and closed otherwise.
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let pools = self.pools.clone();
                runtime.spawn(async move {
                    let ready = tokio::time::timeout(READY_WITHIN, sender.ready()).await;
                    if matches!(ready, Ok(Ok(()))) {
                        pools.hyper.put(sender);
                    }
                });
            }
            Inner::Lean(reader) => {
                if let Some(conn) = reader.reusable() {
                    self.pools.lean.put(conn);
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut frame = match &mut this.inner {
            Inner::Hyper { body, .. } => {
                ready!(Pin::new(body).poll_frame(cx)).map(|f| f.map_err(BoxError::from))
            }
            Inner::Lean(reader) => {
                ready!(Pin::new(reader).poll_frame(cx)).map(|f| f.map_err(BoxError::from))
            }
        };
        if let Some(Ok(trailers)) = &mut frame
            && let Some(trailers) = trailers.trailers_mut()
        {
            for name in &this.pools.hidden {
                trailers.remove(name);
            }
        }
        match &frame {
            Some(Err(e)) => {
                // The client sees its answer cut short; the log says why, since the
                // access log has already counted the answer by its head.
                tracing::warn!("the application's answer broke off: {}", chain(e.as_ref()));
                if let Inner::Hyper { reuse, .. } = &mut this.inner {
                    *reuse = None;
                }
            }
            Some(Ok(_)) if !this.is_end_stream() => {}
            _ => this.release(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Hyper { body, .. } => body.is_end_stream(),
            Inner::Lean(reader) => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Hyper { body, .. } => body.size_hint(),
            Inner::Lean(reader) => reader.size_hint(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The server stops polling a body that says it has ended.
        if self.is_end_stream() {
            self.release();
        }
    }
}

/// Whether a request still asks for an upgrade (a WebSocket handshake the proxy passes).
fn headers_ask_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
}

fn describe(e: &hyper::Error) -> String {
    chain(e)
}

/// An error and its sources, one after the other.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
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
    let upgrade = headers.get(header::UPGRADE)?;
    (asks && upgrade.as_bytes().eq_ignore_ascii_case(b"websocket")).then(|| upgrade.clone())
}

/// Whether a 101's head completes a client's WebSocket handshake (RFC 6455 §4.2.2):
/// `Connection: upgrade` and `Upgrade: websocket`, and one `Sec-WebSocket-Accept` that is
/// base64(SHA-1(the client's `Sec-WebSocket-Key` + the protocol's GUID)). Only an
/// application that read the handshake can answer so. A client that sent no key asked
/// for no handshake the 101 could complete (every WebSocket client sends one), so no
/// 101 completes it: the client must not decide that the check is skipped.
pub fn completes_websocket_handshake(headers: &HeaderMap, key: Option<&HeaderValue>) -> bool {
    if upgrade_protocol(headers).is_none() {
        return false;
    }
    let Some(key) = key else {
        return false;
    };
    let mut digest = Sha1::new();
    digest.update(key.as_bytes());
    digest.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let expected = STANDARD.encode(digest.finalize());
    let mut accepts = headers.get_all(header::SEC_WEBSOCKET_ACCEPT).iter();
    let first = accepts.next();
    accepts.next().is_none() && first.is_some_and(|v| v.as_bytes() == expected.as_bytes())
}

// A static, not a const: a const array would be built and dropped at every use.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

/// A repeated `Content-Length` (`3, 3`, or the field twice) may be accepted when its
/// values agree (RFC 9110 §8.6), but is passed on as one field with one value: clients
/// refuse it, or read until the connection closes.
fn single_content_length(headers: &mut HeaderMap) -> Result<(), &'static str> {
    let mut fields = headers.get_all(header::CONTENT_LENGTH).iter();
    match (fields.next(), fields.next()) {
        (None, _) => return Ok(()),
        (Some(one), None) if !one.as_bytes().contains(&b',') => return Ok(()),
        _ => {}
    }
    if let Some(length) = crate::http1::content_length(headers)? {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(())
}

/// Whether a header belongs to one connection only (RFC 9110 §7.6.1).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == header::PROXY_AUTHORIZATION
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), including every header
/// `Connection` names, except those in `spared`. With `keep_upgrade`, a message that asks
/// for an upgrade keeps `Upgrade` and `Connection: upgrade`, so that a WebSocket
/// handshake passes.
pub fn remove_hop_by_hop(
    headers: &mut HeaderMap,
    keep_upgrade: bool,
    spared: &[HeaderName],
) -> Result<(), UnknownCoding> {
    // Most messages carry none: one scan of the names is cheaper than a dozen removals.
    if !headers.keys().any(is_hop_by_hop) {
        return Ok(());
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if let Some(coding) = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|c| c.trim_ascii())
            .find(|c| !c.eq_ignore_ascii_case(b"chunked"))
        {
            return Err(UnknownCoding(String::from_utf8_lossy(coding).into_owned()));
        }
        // RFC 9112 §6.3: the body is chunked whatever Content-Length says, and a
        // Content-Length passed on beside the new framing would cut or stall it.
        headers.remove(header::CONTENT_LENGTH);
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
        .filter(|name| !spared.contains(name))
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
    Ok(())
}

/// A transfer coding other than `chunked` (`gzip, chunked`, say). The proxy frames each
/// body anew for the next hop, so it cannot pass one on: the recipient would get the
/// coded bytes without the header that names the coding.
#[derive(Debug)]
pub struct UnknownCoding(String);

impl std::fmt::Display for UnknownCoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "transfer coding `{}` is not supported", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url_keeps_its_prefix() {
        let u = UpstreamUrl::parse("http://127.0.0.1:3000/app/").unwrap();
        let pq = PathAndQuery::from_static("/x?y=1");
        assert_eq!(u.target(Some(&pq)).unwrap(), "/app/x?y=1");
        assert_eq!(u.address, "127.0.0.1:3000");
        let plain = UpstreamUrl::parse("http://[::1]").unwrap();
        assert_eq!(plain.address, "[::1]:80");
        assert_eq!(plain.target(None).unwrap(), "/");
        assert!(UpstreamUrl::parse("https://a:1").is_err());
        for bad in [
            "http://127.0.0.1:65536",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:abc",
            "http://127.0.0.1:0",
            "http://127.0.0.1:",
            "http://127.0.0.1:+80",
            "http://127.0.0.1:3000/#frag",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            UpstreamUrl::parse("http://a:65535").unwrap().address,
            "a:65535"
        );
        assert_eq!(
            UpstreamUrl::parse("http://[::1]:8080").unwrap().address,
            "[::1]:8080"
        );
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
        remove_hop_by_hop(&mut h, true, &[]).unwrap();
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn chunked_framing_overrides_content_length_and_other_codings_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("Chunked"),
        );
        remove_hop_by_hop(&mut h, true, &[]).unwrap();
        assert!(h.is_empty(), "{h:?}");
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, chunked"),
        );
        let e = remove_hop_by_hop(&mut h, true, &[]).unwrap_err();
        assert_eq!(e.to_string(), "transfer coding `gzip` is not supported");
    }
}
