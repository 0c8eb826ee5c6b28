//! One request through the proxy.
//!
//! [`Proxy::serve`] is the whole path at a glance: exclude? → load session → forward →
//! apply the application's answer → set cookie → respond. Each step lives in its own
//! module; this file only strings them together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, SEC_WEBSOCKET_KEY, SET_COOKIE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::Config;
use crate::metrics::{Metrics, Outcome};
use crate::problem::Problem;
use crate::session::codec::{self, Merged};
use crate::session::cookie::{self, Presented, SessionCookie};
use crate::session::exclude::Exclusions;
use crate::session::id::{IdShape, SessionId};
use crate::session::protocol::{Change, ProtocolHeaders};
use crate::shutdown::Shutdown;
use crate::store::{
    Landed, NewSession, PatchOutcome, Record, Rotated, Store, StoreError, unix_now,
};
use crate::upstream::{self, ClientBody, ProxyBody, Upstream, UpstreamBody, UpstreamError};

/// Everything one request needs, shared by all connections.
pub struct Proxy {
    cookie: SessionCookie,
    exclusions: Exclusions,
    headers: ProtocolHeaders,
    store: Arc<dyn Store>,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
    shape: IdShape,
    renew_on_access: bool,
    max_bytes: usize,
    rotate_grace: Duration,
    /// `session.user_key`: the key naming a session's user.
    user_key: Option<String>,
    /// `trust_forwarded`: the forwarding fields come from a proxy of the operator's.
    trust_forwarded: bool,
    absolute_timeout: Option<u64>,
    max_header_bytes: usize,
    /// How long a tunnel's other side may stay open once one side has closed
    /// (`timeouts.client_send`).
    tunnel_linger: Duration,
}

/// The session a request arrived with.
enum Current {
    /// No (well-formed) session cookie.
    Absent,
    /// A well-formed cookie the store does not know (or whose session has ended).
    Stale,
    Live {
        id: SessionId,
        record: Record,
        resign: bool,
    },
}

/// What the response does with the cookie.
enum CookieAction {
    Keep,
    Set(SessionId),
    Clear,
}

/// The answer to a request whose session was gone by the time its answer was applied:
/// revoked or expired meanwhile, or a copy a rotation left behind that ran out. The answer
/// was made from the session as it was, so it changes nothing: it must not start a session
/// of its own (that would bring back a revoked one, or push a new ID out of the browser)
/// and does not touch the cookie. The browser's cookie is either the session's new ID or
/// one that the next request finds gone, and clears.
const VANISHED: (Outcome, CookieAction) = (Outcome::None, CookieAction::Keep);

/// A request the proxy answers itself, with a problem.
struct Refused {
    problem: Problem,
    /// What the request had done with its session when it failed: nothing changed, so
    /// `Read` once a session was read, `Excluded` on an excluded path, else `None`.
    outcome: Outcome,
    /// The session the request came with, for the access log.
    session: Option<SessionId>,
    /// What the answer does with the cookie: it follows a session that moved to a fresh
    /// ID before the failure.
    cookie: CookieAction,
}

impl From<Problem> for Refused {
    fn from(problem: Problem) -> Refused {
        Refused {
            problem,
            outcome: Outcome::None,
            session: None,
            cookie: CookieAction::Keep,
        }
    }
}

/// A finished request, for the metrics and the access log.
struct Served {
    response: Response<ProxyBody>,
    outcome: Outcome,
    /// The session the request ended with, for the access log's tag.
    session: Option<SessionId>,
}

impl Proxy {
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        upstream: Upstream,
        metrics: Arc<Metrics>,
        shutdown: Arc<Shutdown>,
    ) -> Result<Proxy, String> {
        let s = &config.session;
        Ok(Proxy {
            cookie: SessionCookie::new(s),
            exclusions: Exclusions::new(&s.exclude)?,
            headers: ProtocolHeaders::new(s),
            store,
            upstream,
            metrics,
            shutdown,
            shape: IdShape::new(s.id_bytes).unwrap_or_default(),
            renew_on_access: s.renew_on_access,
            max_bytes: s.max_bytes,
            rotate_grace: Duration::from_secs(s.rotate_grace),
            user_key: s.user_key.clone(),
            trust_forwarded: config.trust_forwarded,
            absolute_timeout: s.absolute_timeout,
            max_header_bytes: config.limits.max_header_bytes,
            tunnel_linger: crate::config::secs(config.timeouts.client_send),
        })
    }

    /// Serves one request and records it in the metrics and the access log.
    /// `client` is the client's IP address, as `X-Forwarded-For` carries it.
    pub async fn handle(
        &self,
        req: Request<ClientBody>,
        client: HeaderValue,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let version = req.version();
        let method = req.method().clone();
        // Shares the request's bytes: no copy of the path for the log.
        let uri = req.uri().clone();
        let path = uri.path();
        let outcome = if head_size(&req) > self.max_header_bytes {
            Err(Refused::from(Problem::headers_too_large(
                self.max_header_bytes,
            )))
        } else {
            self.serve(req, &client).await
        };
        let served = match outcome {
            Ok(served) => served,
            Err(Refused {
                problem,
                outcome,
                session,
                cookie,
            }) => {
                if problem.kind == "session-protocol-violation" {
                    self.metrics.protocol_violation();
                }
                // The client's mistakes (a malformed request, a body broken off) are no
                // trouble of the proxy's or the application's.
                macro_rules! log_at {
                    ($level:ident) => {
                        tracing::$level!(status = problem.status.as_u16(),
                            session_tag = %tag_of(&session), %method, %path,
                            "{}: {}", problem.title,
                            problem.cause.as_deref().unwrap_or(&problem.detail))
                    };
                }
                if problem.status.is_client_error() {
                    log_at!(info);
                } else {
                    log_at!(warn);
                }
                let mut response = problem.into_response();
                self.set_cookie(response.headers_mut(), cookie);
                Served {
                    response,
                    outcome,
                    session,
                }
            }
        };
        let took = started.elapsed();
        let status = served.response.status();
        self.metrics.request(status, served.outcome, took);
        tracing::info!(
            target: "session_proxy::access",
            %method,
            %path,
            status = status.as_u16(),
            // Whole microseconds, so that the figure reads 0.396, not 0.39591099999999996.
            duration_ms = took.as_micros() as f64 / 1000.0,
            session = served.outcome.as_str(),
            session_tag = %tag_of(&served.session),
        );
        let mut response = served.response;
        // Draining: HTTP/1.1 clients are asked to go on over new connections (to another
        // instance, or to this one while it still accepts), so that when the drain delay
        // ends few of them are caught sending on a connection that closes. (HTTP/2
        // clients get a GOAWAY then; HTTP/1.0 ones keep a connection only when they ask,
        // and hyper answers them.)
        if version == Version::HTTP_11
            && status != StatusCode::SWITCHING_PROTOCOLS
            && self.shutdown.is_draining()
        {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// A request hyper's HTTP/1 parser refused and answered itself with `status`, before
    /// the proxy saw it (a malformed head: 400; too many or too long fields: 431; a target
    /// too long: 414): counted and logged like the proxy's own refusals, with what is
    /// known of it.
    pub fn refused_by_parser(&self, status: StatusCode, why: &str) {
        self.metrics.request(status, Outcome::None, Duration::ZERO);
        tracing::info!(
            status = status.as_u16(),
            "malformed request, refused by the HTTP/1 parser: {why}"
        );
        tracing::info!(
            target: "session_proxy::access",
            method = "-",
            path = "-",
            status = status.as_u16(),
            duration_ms = 0.0,
            session = Outcome::None.as_str(),
            session_tag = "-",
        );
    }

    /// The request path, step by step.
    async fn serve(
        &self,
        mut req: Request<ClientBody>,
        client: &HeaderValue,
    ) -> Result<Served, Refused> {
        root_absolute_target(&mut req);
        check_target(&req).map_err(Problem::bad_request)?;
        // First of all, so that no header the proxy adds can be named by the client's
        // `Connection` and dropped on the way out.
        upstream::remove_hop_by_hop(req.headers_mut(), true, &[HOST])
            .map_err(|e| Problem::bad_request(e.to_string()))?;
        self.headers.strip(req.headers_mut());
        if self.trust_forwarded {
            crate::session::protocol::strip_untrusted_forwarding(req.headers_mut());
        } else {
            crate::session::protocol::strip_foreign_forwarding(req.headers_mut());
        }
        crate::session::protocol::strip_framing_look_alikes(req.headers_mut());
        // Only a WebSocket upgrade is still asked for here: any other left with the
        // hop-by-hop headers.
        let client_upgrade = upstream::upgrade_protocol(req.headers())
            .is_some()
            .then(|| Upgrade {
                key: req.headers().get(SEC_WEBSOCKET_KEY).cloned(),
                client: hyper::upgrade::on(&mut req),
                held: req.extensions_mut().remove::<Held>(),
            });
        if self.exclusions.matches(req.uri().path()) {
            // No session here, but the application still never sees the session ID.
            self.cookie.strip(req.headers_mut());
            let excluded = |problem| Refused {
                outcome: Outcome::Excluded,
                ..Refused::from(problem)
            };
            let mut response = self.forward(req, client).await.map_err(excluded)?;
            self.headers.strip(response.headers_mut());
            check_switch(&response, client_upgrade.as_ref()).map_err(excluded)?;
            self.tunnel(client_upgrade, &mut response);
            return Ok(Served {
                response: response.map(Either::Left),
                outcome: Outcome::Excluded,
                session: None,
            });
        }

        let presented = self.cookie.take(req.headers_mut());
        let presented_id = presented.as_ref().map(|p| p.id.clone());
        let refused = |problem: Problem, outcome| Refused {
            problem,
            outcome,
            session: presented_id.clone(),
            cookie: CookieAction::Keep,
        };
        let current = self
            .load(presented)
            .await
            .map_err(|problem| refused(problem, Outcome::None))?;
        // From here a failure leaves the session as it was read.
        let read = match current {
            Current::Live { .. } => Outcome::Read,
            Current::Absent | Current::Stale => Outcome::None,
        };
        let fail = |problem: Problem| refused(problem, read);
        self.hand_session_to_app(&current, req.headers_mut());

        let mut response = self.forward(req, client).await.map_err(fail)?;
        // Before the answer is applied: an unasked 101 changes nothing.
        check_switch(&response, client_upgrade.as_ref()).map_err(fail)?;
        let answer = self
            .headers
            .take_answer(response.headers_mut(), self.max_bytes)
            .map_err(|v| fail(Problem::protocol_violation(v.to_string())))?;

        let (outcome, action) = self
            .apply(current, answer.change, answer.rotate)
            .await
            .map_err(|(problem, cookie)| Refused {
                // A session that moved to a fresh ID before the failure was changed.
                outcome: match cookie {
                    CookieAction::Set(_) => Outcome::Updated,
                    _ => read,
                },
                cookie,
                ..fail(problem)
            })?;
        let session = match &action {
            CookieAction::Set(id) => Some(id.clone()),
            _ => presented_id,
        };
        self.set_cookie(response.headers_mut(), action);
        self.tunnel(client_upgrade, &mut response);
        Ok(Served {
            response: response.map(Either::Left),
            outcome,
            session,
        })
    }

    async fn forward(
        &self,
        req: Request<ClientBody>,
        client: &HeaderValue,
    ) -> Result<Response<UpstreamBody>, Problem> {
        let started = Instant::now();
        let result = self.upstream.forward(req, client).await;
        self.metrics.upstream(started.elapsed());
        result.map_err(|e| match e {
            // Why names the application's address: the log's business, not the client's.
            UpstreamError::Unreachable(why) => Problem {
                cause: Some(format!("no answer from the application: {why}")),
                ..Problem::bad_gateway(
                    "the application could not be reached, or broke off before answering; the proxy's log says why",
                )
            },
            UpstreamError::Timeout => Problem::timeout(),
            UpstreamError::BadRequest(why) => Problem::bad_request(why),
            UpstreamError::Invalid(why) => Problem::bad_gateway(why),
            UpstreamError::BodyPaused(why) => Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "Request body timed out",
                why,
            ),
        })
    }

    /// Reads the session the cookie names. A store error is a 503: the request is never
    /// forwarded with an empty session in place of one that could not be read.
    async fn load(&self, presented: Option<Presented>) -> Result<Current, Problem> {
        let Some(Presented { id, needs_resign }) = presented else {
            return Ok(Current::Absent);
        };
        let record = self
            .store
            .load(&id, self.renew_on_access)
            .await
            .map_err(unavailable)?;
        let Some(record) = record else {
            return Ok(Current::Stale);
        };
        if let Some(limit) = self.absolute_timeout
            && record.created.saturating_add(limit) <= unix_now().as_secs()
        {
            return Ok(Current::Stale);
        }
        Ok(Current::Live {
            id,
            record,
            resign: needs_resign,
        })
    }

    fn hand_session_to_app(&self, current: &Current, headers: &mut HeaderMap) {
        match current {
            Current::Live { id, record, .. } => {
                headers.insert(&self.headers.request, codec::encode(&record.data));
                if let Ok(handle) = http::HeaderValue::try_from(id.handle()) {
                    headers.insert(&self.headers.handle, handle);
                }
            }
            _ => {
                headers.insert(&self.headers.request, codec::EMPTY_SESSION);
            }
        }
    }

    /// Applies the application's answer to the store and decides what the cookie does.
    /// When it fails after the session moved to a fresh ID, the error still sets that ID's
    /// cookie: the session is there, unchanged, under it alone.
    async fn apply(
        &self,
        current: Current,
        change: Change,
        rotate: bool,
    ) -> Result<(Outcome, CookieAction), (Problem, CookieAction)> {
        let (mut id, resign, mut moved, before) = match current {
            Current::Live { id, resign, record } => {
                // A patch the rotation would not survive is refused before anything moves.
                if let (true, Change::Patch(patch)) = (rotate, &change) {
                    merge_into(Some(&record.data), patch, self.max_bytes)
                        .map_err(|p| (p, CookieAction::Keep))?;
                }
                (id, resign, record.moved, record.data)
            }
            Current::Stale => {
                return self
                    .without_session(change, CookieAction::Clear)
                    .await
                    .map_err(|p| (p, CookieAction::Keep));
            }
            Current::Absent => {
                return self
                    .without_session(change, CookieAction::Keep)
                    .await
                    .map_err(|p| (p, CookieAction::Keep));
            }
        };
        // The ID a rotation moved away from, readable for its grace period.
        let mut previous = None;
        // A destroyed session ends under every ID at once: there is nothing to rotate.
        if rotate && !matches!(change, Change::Destroy) {
            // Rotate before writing: the change lands on the fresh ID only, and the old ID
            // keeps the session as it was before (not, say, a fresh login) for its grace
            // period.
            let fresh = SessionId::generate(self.shape);
            let rotated = self.store.rotate(&id, &fresh, self.rotate_grace).await;
            match rotated.map_err(|e| (unavailable(e), CookieAction::Keep))? {
                Rotated::Done => {
                    previous = Some(std::mem::replace(&mut id, fresh));
                    moved = false;
                }
                // Another request (a second login at once) moved it first: this one's
                // change stays with the old copy, and the browser keeps the new ID.
                Rotated::Moved => moved = true,
                // Ended while the application worked on it: see `VANISHED`.
                Rotated::Missing => return Ok(VANISHED),
            }
        }
        let fresh = previous.is_some().then(|| id.clone());
        let on_failure = || fresh.clone().map_or(CookieAction::Keep, CookieAction::Set);
        let failed = |e: StoreError| (unavailable(e), on_failure());
        // The session as this request's change left it, when it wrote one.
        let mut after = None;
        let outcome = match change {
            Change::Nothing if previous.is_some() => Outcome::Updated,
            Change::Nothing => Outcome::Read,
            Change::Destroy => match self.store.delete(&id).await.map_err(failed)? {
                Landed::Done if !moved => return Ok((Outcome::Destroyed, CookieAction::Clear)),
                // Only the copy a rotation left behind (the old ID has no say over the
                // session under the new one, the browser's, not even to end it), or
                // nothing left to end: see `VANISHED`.
                _ => return Ok(VANISHED),
            },
            Change::Replace(data) => match self.store.replace(&id, data.clone()).await {
                Ok(Landed::Done) => {
                    after = Some(data);
                    Outcome::Updated
                }
                Ok(Landed::Moved) => {
                    moved = true;
                    Outcome::Updated
                }
                // Ended while the application worked on it: see `VANISHED`.
                Ok(Landed::Missing) => return Ok(VANISHED),
                Err(e) => return Err(failed(e)),
            },
            Change::Patch(patch) => match self.store.patch(&id, &patch).await {
                Ok(PatchOutcome::Updated(data)) => {
                    after = Some(data);
                    Outcome::Updated
                }
                Ok(PatchOutcome::Moved(_)) => {
                    moved = true;
                    Outcome::Updated
                }
                Ok(PatchOutcome::Destroyed) => {
                    // The rotation left the old ID readable: it ends now too.
                    if let Some(previous) = &previous {
                        // Failing, the cookie stays (a store error never clears one): it
                        // names the session just destroyed, and the next request clears it.
                        let deleted = self.store.delete(previous).await;
                        deleted.map_err(|e| (unavailable(e), CookieAction::Keep))?;
                    }
                    return Ok((Outcome::Destroyed, CookieAction::Clear));
                }
                Ok(PatchOutcome::Missing) => return Ok(VANISHED),
                Err(e) => return Err(failed(e)),
            },
        };
        // A rotation whose change logs the user out (a logout that keeps the cart) leaves
        // the old ID the session as it is now, not as it was: whoever holds the old ID
        // (planted, logged, sniffed) is not still logged in for the grace period. Only
        // when the change leaves no user: a login as another user keeps the old ID the
        // session as it was, as every login does (the new user's session is not the old
        // ID holder's to read).
        if let (Some(previous), Some(after), Some(key)) = (&previous, &after, &self.user_key)
            && codec::user_of(&before, key).is_some()
            && codec::user_of(after, key).is_none()
        {
            self.store
                .replace(previous, after.clone())
                .await
                .map_err(failed)?;
        }
        if outcome == Outcome::Read && !self.renew_on_access && !resign {
            return Ok((outcome, CookieAction::Keep));
        }
        // A request that started before its session moved to a new ID must not hand the
        // old ID's cookie back: it would replace the new one in the browser, which would
        // lose the session when the grace period ends. A write reports the move itself.
        if previous.is_none()
            && (moved
                || (outcome == Outcome::Read && !self.store.current(&id).await.unwrap_or(false)))
        {
            return Ok((outcome, CookieAction::Keep));
        }
        Ok((outcome, CookieAction::Set(id)))
    }

    /// The answer for a request that has no live session: only a write that leaves a
    /// non-empty session creates one (lazy creation); otherwise `otherwise` applies.
    async fn without_session(
        &self,
        change: Change,
        otherwise: CookieAction,
    ) -> Result<(Outcome, CookieAction), Problem> {
        let data = match change {
            Change::Replace(data) => data,
            Change::Patch(patch) => match merge_into_nothing(&patch, self.max_bytes)? {
                Some(data) => data,
                None => return Ok((Outcome::None, otherwise)),
            },
            Change::Nothing | Change::Destroy => return Ok((Outcome::None, otherwise)),
        };
        Ok((
            Outcome::Created,
            CookieAction::Set(self.create(data).await?),
        ))
    }

    /// Stores a new session under a freshly generated ID.
    async fn create(&self, data: Bytes) -> Result<SessionId, Problem> {
        let id = SessionId::generate(self.shape);
        let created = unix_now().as_secs();
        let session = NewSession {
            data,
            created,
            ends: self.absolute_timeout.map(|t| created.saturating_add(t)),
        };
        self.store.create(&id, session).await.map_err(unavailable)?;
        Ok(id)
    }

    fn set_cookie(&self, headers: &mut HeaderMap, action: CookieAction) {
        let value = match action {
            CookieAction::Keep => return,
            CookieAction::Set(id) => self.cookie.set(&id),
            CookieAction::Clear => self.cookie.clear(),
        };
        headers.append(SET_COOKIE, value);
        cookie::keep_out_of_shared_caches(headers);
    }

    /// After a 101 answer to a WebSocket upgrade, joins the client's and the
    /// application's connections.
    fn tunnel(&self, upgrade: Option<Upgrade>, response: &mut Response<UpstreamBody>) {
        let Some(Upgrade { client, held, .. }) = upgrade else {
            return;
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let upstream = hyper::upgrade::on(&mut *response);
        let metrics = self.metrics.clone();
        let stop = self.shutdown.tunnels_cancelled();
        let linger = self.tunnel_linger;
        self.shutdown.tunnels().spawn(async move {
            // The tunnel is still the client's connection: it counts as open, and against
            // `limits.max_connections`, until it ends.
            let _held = held;
            let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else {
                return;
            };
            metrics.tunnels().inc();
            tokio::select! {
                _ = join(TokioIo::new(client), TokioIo::new(upstream), linger) => {}
                _ = stop.cancelled() => {}
            }
            metrics.tunnels().dec();
        });
    }
}

/// Copies bytes both ways between a tunnel's two sides. Once one side has closed (its
/// end passed on as a half-close), the other has `linger` to finish: a peer that never
/// closes its side cannot hold the tunnel, and its place under `limits.max_connections`,
/// for ever.
async fn join<A, B>(a: A, b: B, linger: Duration)
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let a_to_b = async {
        let _ = tokio::io::copy(&mut a_read, &mut b_write).await;
        let _ = b_write.shutdown().await;
    };
    let b_to_a = async {
        let _ = tokio::io::copy(&mut b_read, &mut a_write).await;
        let _ = a_write.shutdown().await;
    };
    tokio::pin!(a_to_b, b_to_a);
    tokio::select! {
        () = &mut a_to_b => { let _ = tokio::time::timeout(linger, b_to_a).await; }
        () = &mut b_to_a => { let _ = tokio::time::timeout(linger, a_to_b).await; }
    }
}

/// What a client connection's server puts in a request that asks for an upgrade: it keeps
/// the connection counted as open while the request, or the tunnel it becomes, lives.
#[derive(Clone)]
pub struct Held(pub Arc<dyn std::any::Any + Send + Sync>);

/// A client's WebSocket upgrade, until the application's answer says whether it happens.
struct Upgrade {
    /// The handshake's `Sec-WebSocket-Key`, which the application's 101 must answer.
    key: Option<HeaderValue>,
    client: hyper::upgrade::OnUpgrade,
    held: Option<Held>,
}

/// A 101 that does not complete the WebSocket handshake the client asked for is a 502:
/// through the tunnel, bytes the proxy never reads would reach the application. An
/// application route that can be made to answer 101 (a status taken from the request)
/// would otherwise let a client send it raw requests, a made-up `X-Session` in them.
fn check_switch(response: &Response<UpstreamBody>, asked: Option<&Upgrade>) -> Result<(), Problem> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(());
    }
    let Some(asked) = asked else {
        return Err(Problem::bad_gateway(
            "the application switched protocols, but the request did not ask to",
        ));
    };
    if !upstream::completes_websocket_handshake(response.headers(), asked.key.as_ref()) {
        return Err(Problem::bad_gateway(
            "the application switched protocols without completing the WebSocket handshake: \
             a 101 needs `Upgrade: websocket` and the `Sec-WebSocket-Accept` the request's key asks for",
        ));
    }
    Ok(())
}

/// An HTTP/1 absolute-form target without a path but with a query (`http://a.com?x=1`)
/// asks for the root: its origin form is `/?x=1` (RFC 9112 §3.2.1). Not over HTTP/2,
/// where every request has an authority and a `:path` must start with `/` (RFC 9113
/// §8.3.1).
fn root_absolute_target<B>(req: &mut Request<B>) {
    if req.uri().authority().is_none() || req.version() >= Version::HTTP_2 {
        return;
    }
    let Some(query) = req
        .uri()
        .path_and_query()
        .and_then(|pq| pq.as_str().strip_prefix('?'))
    else {
        return;
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(format!("/?{query}")).ok();
    if let Ok(rooted) = Uri::from_parts(parts) {
        *req.uri_mut() = rooted;
    }
}

/// A request a reverse proxy can pass on: a path to a resource on this host (or
/// `OPTIONS *`), not a tunnel (`CONNECT`) or another host's name alone; and, from an
/// HTTP/1.1 client, exactly one `Host` (RFC 9112 §3.2), at most one from others.
fn check_target<B>(req: &Request<B>) -> Result<(), &'static str> {
    if req.method() == Method::CONNECT {
        return Err("CONNECT is not supported: this is a reverse proxy");
    }
    let target = req.uri().path_and_query().map(PathAndQuery::as_str);
    let server_wide = req.method() == Method::OPTIONS && target == Some("*");
    if !(server_wide || target.is_some_and(|t| t.starts_with('/'))) {
        return Err("the request target must be a path (/…), an absolute URL, or OPTIONS *");
    }
    if crate::session::exclude::leaves_root(req.uri().path()) {
        return Err("the request path climbs above the root with `..` segments");
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() || (host.is_none() && req.version() == Version::HTTP_11) {
        return Err("an HTTP/1.1 request needs exactly one Host header");
    }
    // `host[:port]` (RFC 9110 §7.2), or empty for a target without one: never a list, a
    // path or user information, which the application and the proxy could read apart.
    if let Some(host) = host.map(HeaderValue::as_bytes)
        && !host.is_empty()
        && !is_host_and_port(host)
    {
        return Err("the Host header is not a host name or address with an optional port");
    }
    // An absolute-form target names this proxy's own scheme.
    if let Some(scheme) = req.uri().scheme_str()
        && !scheme.eq_ignore_ascii_case("http")
        && !scheme.eq_ignore_ascii_case("https")
    {
        return Err("the request target's scheme is not http or https");
    }
    // The same for the target's own authority, which replaces `Host` on the way.
    if let Some(authority) = req.uri().authority() {
        let host = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, host)| host);
        if !is_host_and_port(host.as_bytes()) {
            return Err("the request target's host is not a host name or address");
        }
    }
    Ok(())
}

/// Whether `value` is a host name, an IPv4 address or a bracketed IPv6 address (with a
/// zone), then optionally `:` and a port of at most five digits. Stricter than RFC 3986's
/// reg-name, which allows `,`, `;`, `*` and the like: real host names never hold them,
/// and a `Host` of `a.com,b.com` reads as one host to one server and as a list to another.
fn is_host_and_port(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|b| *b == b':') {
        // An IPv6 literal's colons are inside its brackets.
        Some(colon) if !value[colon..].contains(&b']') => {
            (&value[..colon], Some(&value[colon + 1..]))
        }
        _ => (value, None),
    };
    // `port = *DIGIT` (RFC 3986 §3.2.3): it may be empty.
    let port_ok = port.is_none_or(|p| {
        p.is_empty()
            || (p.len() <= 5
                && p.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(p).is_ok_and(|p| p.parse::<u16>().is_ok()))
    });
    let host_ok = match host {
        // An IPv6 address (hex digits, colons, an IPv4 tail), then perhaps a zone.
        [b'[', inner @ .., b']'] => {
            let (address, zone) = match inner.iter().position(|b| *b == b'%') {
                Some(at) => (&inner[..at], Some(&inner[at + 1..])),
                None => (inner, None),
            };
            address.contains(&b':')
                && address
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
                && zone.is_none_or(|z| {
                    !z.is_empty()
                        && z.iter().all(|b| {
                            b.is_ascii_alphanumeric()
                                || matches!(b, b'%' | b'-' | b'.' | b'_' | b'~')
                        })
                })
        }
        _ => {
            !host.is_empty()
                && host
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        }
    };
    port_ok && host_ok
}

/// The access log's tag for a session, computed only when a log line is written.
fn tag_of(session: &Option<SessionId>) -> impl std::fmt::Display + '_ {
    struct Tag<'a>(&'a Option<SessionId>);
    impl std::fmt::Display for Tag<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.0 {
                Some(id) => f.write_str(&id.log_tag()),
                None => f.write_str("-"),
            }
        }
    }
    Tag(session)
}

/// Bytes of the request head as the client sent it (for HTTP/2, as it would be in HTTP/1.1).
fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers().iter().fold(line, |n, (name, value)| {
        n + name.as_str().len() + value.len() + 4
    })
}

fn merge_into_nothing(patch: &Value, max_bytes: usize) -> Result<Option<Bytes>, Problem> {
    merge_into(None, patch, max_bytes)
}

fn merge_into(
    stored: Option<&[u8]>,
    patch: &Value,
    max_bytes: usize,
) -> Result<Option<Bytes>, Problem> {
    match codec::merge_patch(stored, patch, max_bytes) {
        Ok(Merged::Data(data)) => Ok(Some(data)),
        Ok(Merged::Empty) => Ok(None),
        Err(n) => Err(Problem::protocol_violation(
            StoreError::TooLarge(n).to_string(),
        )),
    }
}

fn unavailable(e: StoreError) -> Problem {
    match e {
        StoreError::TooLarge(_) => Problem::protocol_violation(e.to_string()),
        // The title already says "session store unavailable"; why is for the log.
        StoreError::Unavailable(why) => Problem::store_failed(why),
        e => Problem::store_unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::is_host_and_port;

    #[test]
    fn hosts_are_names_or_addresses_with_an_optional_port() {
        for good in [
            "example.com",
            "example.com:8080",
            "EXAMPLE.com.",
            "a-b_c.example",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "[fe80::1%25eth0]:80",
            "localhost:65535",
            "example.com:",
            "[::1]:",
            "[::ffff:127.0.0.1]",
            "[fe80::1%eth0]",
        ] {
            assert!(is_host_and_port(good.as_bytes()), "{good}");
        }
        for bad in [
            "a.com,b.com",
            "a.com:80,b.com",
            "a.com,",
            ",a.com",
            "*",
            "a.com;x",
            "a.com:abc",
            "a.com:+80",
            "a.com:99999",
            ":80",
            "[example.com]",
            "[%]",
            "[::1%]",
            "[v1.x]",
            "user@a.com",
            "a.com/x",
            "a b",
            "[::1",
            "[]",
            "[::1]x",
            "a.com:80:80",
        ] {
            assert!(!is_host_and_port(bad.as_bytes()), "{bad}");
        }
    }
}
