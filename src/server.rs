//! The listener: builds the proxy from its configuration, accepts client connections
//! (HTTP/1.1 and cleartext HTTP/2), serves the admin port, and drains on a signal.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, StatusCode};
use http_body_util::Either;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, StoreHealth};
use crate::config::{Config, StoreConfig, StoreType, mask_url, secs};
use crate::http1;
use crate::http1::server::{Graceful, Limits, Next};
use crate::metrics::Metrics;
use crate::proxy::{Held, Proxy};
use crate::session::protocol::ProtocolHeaders;
use crate::shutdown::Shutdown;
use crate::store::memory::MemoryStore;
use crate::store::metered::Metered;
use crate::store::redis::{RedisOptions, RedisStore, Topology};
use crate::store::{Store, StoreSettings};
use crate::upstream::{ClientBody, Paced, ProxyBody, Upstream, UpstreamUrl};

/// A proxy whose listeners are bound, ready to [`Server::run`].
pub struct Server {
    config: Config,
    workers: Workers,
    listener: TcpListener,
    admin: Option<(TcpListener, Admin)>,
    proxy: Arc<Proxy>,
    shutdown: Arc<Shutdown>,
    metrics: Arc<Metrics>,
    leftovers: Arc<Leftovers>,
}

impl Server {
    /// Connects the store and binds the listeners; errors say what to check.
    pub async fn bind(config: Config) -> Result<Server, String> {
        let metrics = Arc::new(Metrics::new(config.store.kind == StoreType::Memory));
        let shutdown = Arc::new(Shutdown::new());
        let leftovers = Arc::new(Leftovers {
            tasks: TaskTracker::new(),
            permits: Arc::new(Semaphore::new(config.limits.max_connections)),
        });
        let workers = Workers::start(config.limits.workers, &leftovers)
            .map_err(|e| format!("cannot start the worker threads (`limits.workers`): {e}"))?;
        let backend = build_store(&config, workers.len()).await?;
        let store: Arc<dyn Store> = Arc::new(Metered::new(backend, metrics.clone()));
        let upstream = Upstream::new(
            UpstreamUrl::parse(&config.upstream)?,
            secs(config.timeouts.upstream_connect),
            secs(config.timeouts.upstream_response),
            workers.len(),
            ProtocolHeaders::new(&config.session)
                .names()
                .into_iter()
                .cloned()
                .collect(),
            crate::http1::client::head_limit(config.session.max_bytes),
        )
        .trusting_forwarded(config.trust_forwarded);
        let proxy = Proxy::new(
            &config,
            store.clone(),
            upstream,
            metrics.clone(),
            shutdown.clone(),
        )?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {} (`listen`): {e}", config.listen))?;
        // A store that is not there at start-up is said so at once, in the log.
        let health = Arc::new(StoreHealth::new(
            store.clone(),
            config.admin_listen.is_some(),
        ));
        let first = health.clone();
        tokio::spawn(async move { first.check_at_start().await });
        let admin = match config.admin_listen {
            None => None,
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr} (`admin_listen`): {e}"))?;
                let admin = Admin::new(health, metrics.clone(), shutdown.clone(), &config);
                Some((l, admin))
            }
        };
        Ok(Server {
            config,
            workers,
            listener,
            admin,
            proxy: Arc::new(proxy),
            shutdown,
            metrics,
            leftovers,
        })
    }

    /// The address the client listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address the admin listener is bound to, when it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn shutdown_handle(&self) -> Arc<Shutdown> {
        self.shutdown.clone()
    }

    /// Serves until the shutdown sequence completes: after [`Shutdown::begin_drain`], the
    /// listener accepts for `shutdown.drain_delay`, then in-flight requests and tunnels
    /// get `shutdown.timeout` to finish.
    pub async fn run(self) {
        let Server {
            config,
            workers,
            listener,
            admin,
            proxy,
            shutdown,
            metrics,
            leftovers,
        } = self;
        let admin_addr = admin.as_ref().and_then(|(l, _)| l.local_addr().ok());
        if let Some((listener, admin)) = admin {
            tokio::spawn(admin.serve(listener));
        }
        let builder = Arc::new(connection_builder(&config));
        let connections = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(config.limits.max_connections));
        let closing = shutdown.closing();
        let drain_delay = secs(config.shutdown.drain_delay);
        let periods = Periods {
            request_every: secs(config.timeouts.header_read),
            client_send: secs(config.timeouts.client_send),
            client_body: secs(config.timeouts.client_body),
            max_head: head_backstop(&config),
        };
        let draining = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.drained().await;
                tokio::time::sleep(drain_delay).await;
                shutdown.close();
            }
        };
        tokio::pin!(draining);
        let admin_at = admin_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
        let store = StoreAt::of(&config.store);
        tracing::info!(
            listen = %config.listen,
            upstream = %config.upstream,
            store = %store.kind,
            store_master = store.master.map(tracing::field::display),
            store_at = store.at.as_deref().map(tracing::field::display),
            admin = %admin_at,
            "session-proxy listening"
        );
        let mut last_full = None;
        loop {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => Ok(slot),
                Err(_) => {
                    // At the cap: said at most once a minute, since it lasts.
                    if last_full.is_none_or(|at: Instant| at.elapsed() >= FULL_WARNING_EVERY) {
                        last_full = Some(Instant::now());
                        tracing::warn!(
                            "limits.max_connections ({}) reached: new connections wait in the \
                             accept queue until one closes",
                            config.limits.max_connections
                        );
                    }
                    tokio::select! {
                        slot = slots.clone().acquire_owned() => slot,
                        _ = &mut draining => break,
                    }
                }
            };
            let Ok(slot) = slot else { break };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut draining => break,
            };
            // The connection moves to a worker's runtime, where it and the upstream
            // connections it uses are served start to finish.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%peer, "cannot hand the connection to a worker: {e}");
                    continue;
                }
            };
            let (proxy, builder, closing, metrics) = (
                proxy.clone(),
                builder.clone(),
                closing.clone(),
                metrics.clone(),
            );
            let worker = workers.least_busy();
            // Counted out when the task ends, however it ends (even unpolled).
            let counted = Arc::new(Counted::new(metrics, worker.open.clone(), slot));
            let serve = async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        let held = Held(counted);
                        serve_connection(stream, peer, proxy, &builder, closing, periods, held)
                            .await;
                    }
                    Err(e) => tracing::warn!(%peer, "cannot serve the connection: {e}"),
                }
            };
            connections.spawn_on(serve, &worker.runtime);
        }
        drop(listener);
        tracing::info!("listener closed; waiting for in-flight requests and tunnels");
        connections.close();
        leftovers.tasks.close();
        let finished = async {
            connections.wait().await;
            leftovers.tasks.wait().await;
            shutdown.tunnels_closed().await;
        };
        if tokio::time::timeout(secs(config.shutdown.timeout), finished)
            .await
            .is_err()
        {
            // How much was cut, to size `shutdown.timeout` (and the orchestrator's grace
            // period) by.
            tracing::warn!(
                connections = connections.len(),
                tunnels = shutdown.tunnels().len(),
                requests_without_client = leftovers.tasks.len(),
                "shutdown.timeout reached: closing what is still open"
            );
            shutdown.cut_tunnels();
        }
        tracing::info!("shutdown complete");
    }
}

/// The answer hyper's HTTP/1 server wrote for a request it could not parse, if it wrote
/// one: 400, 431 or 414 (hyper's `on_error`). An HTTP/2 preface after HTTP/1 requests,
/// say, gets none.
fn parser_answer(e: &hyper::Error) -> Option<StatusCode> {
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    let why = e.to_string();
    if why.starts_with("internal error") {
        return None;
    }
    Some(match e.is_parse_too_large() {
        true if why.starts_with("URI too long") => StatusCode::URI_TOO_LONG,
        true => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        false => StatusCode::BAD_REQUEST,
    })
}

/// How often reaching `limits.max_connections` is said, at most.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// A client connection as the metrics, its worker and the connection cap count it.
struct Counted {
    metrics: Arc<Metrics>,
    open: Arc<AtomicUsize>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Counted {
    fn new(
        metrics: Arc<Metrics>,
        open: Arc<AtomicUsize>,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Counted {
        metrics.connections().inc();
        open.fetch_add(1, Ordering::Relaxed);
        Counted {
            metrics,
            open,
            _slot: slot,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.metrics.connections().dec();
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The threads that serve client connections. Each runs a single-threaded runtime, so a
/// connection, the upstream connections it uses and their timers stay on one thread:
/// no task moves between threads and no thread wakes another within a request. They
/// stop when this is dropped.
struct Workers {
    workers: Vec<Worker>,
    stop: CancellationToken,
}

struct Worker {
    runtime: tokio::runtime::Handle,
    /// Connections this worker serves now.
    open: Arc<AtomicUsize>,
}

thread_local! {
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// The requests this worker's clients left, of the server it belongs to.
    static LEFTOVERS: std::cell::OnceCell<Arc<Leftovers>> = const { std::cell::OnceCell::new() };
}

/// The index of the worker thread this runs on, if it is one.
pub fn current_worker() -> Option<usize> {
    WORKER.with(std::cell::Cell::get)
}

impl Workers {
    /// `count` threads; 0 for one per CPU this process may use.
    fn start(count: usize, leftovers: &Arc<Leftovers>) -> std::io::Result<Workers> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // Built up in place, so that the threads already started stop if one fails to.
        let mut started = Workers {
            workers: Vec::with_capacity(count),
            stop: CancellationToken::new(),
        };
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let stopped = started.stop.clone();
            let leftovers = leftovers.clone();
            std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(index)));
                    LEFTOVERS.with(|l| {
                        l.get_or_init(move || leftovers);
                    });
                    runtime.block_on(stopped.cancelled());
                })?;
            started.workers.push(Worker {
                runtime: handle,
                open: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(started)
    }

    fn len(&self) -> usize {
        self.workers.len()
    }

    /// The worker serving the fewest connections.
    fn least_busy(&self) -> &Worker {
        let mut best = &self.workers[0];
        for worker in &self.workers[1..] {
            if worker.open.load(Ordering::Relaxed) < best.open.load(Ordering::Relaxed) {
                best = worker;
            }
        }
        best
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The proxy checks `limits.max_header_bytes` itself and answers 431 as problem+json;
    // hyper's own limits sit above it as a backstop (and its default of 100 header
    // fields, answered 431 too: a larger array costs every request).
    let backstop = head_backstop(config);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(secs(config.timeouts.header_read))
        .max_buf_size(backstop);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(backstop).unwrap_or(u32::MAX));
    builder
}

/// The longest request head read: twice `limits.max_header_bytes`, at least 16 KiB.
fn head_backstop(config: &Config) -> usize {
    config
        .limits
        .max_header_bytes
        .saturating_mul(2)
        .max(16 * 1024)
}

/// Serves one client connection until it ends or the shutdown asks it to finish.
///
/// A connection must keep bringing requests: one within `timeouts.header_read` of
/// connecting, then at least one per `header_read` period. hyper's header timeout starts
/// only once bytes arrive (the HTTP/1-or-2 detection before it waits for ever) and does
/// not apply to HTTP/2, so without this a client that connects and sends nothing, or
/// keeps an HTTP/2 connection open without using it, would hold a connection slot
/// indefinitely. A connection that brought none at all is dropped; one that went quiet
/// is shut down gracefully, so responses still streaming (and HTTP/2 streams in flight)
/// finish first.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    closing: CancellationToken,
    periods: Periods,
    held: Held,
) {
    let Periods {
        request_every,
        client_send,
        ..
    } = periods;
    let _ = stream.set_nodelay(true);
    let requests = Arc::new(Requests::default());
    // Formatted once per connection, not per request.
    let client =
        HeaderValue::try_from(peer.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
    let writes = Arc::new(Writes::default());
    let refusals = proxy.clone();
    let service = {
        let requests = requests.clone();
        let writes = writes.clone();
        move |mut req: http::Request<ClientBody>| {
            // First, so that the watcher never sees a request of an HTTP/2 connection
            // it does not yet know speaks HTTP/2.
            if req.version() == http::Version::HTTP_2 {
                writes.http2.store(true, Ordering::Relaxed);
            }
            requests.started.fetch_add(1, Ordering::Relaxed);
            // A tunnel outlives the connection's task: it keeps the connection counted.
            if req.headers().contains_key(http::header::UPGRADE) {
                req.extensions_mut().insert(held.clone());
            }
            let (proxy, client) = (proxy.clone(), client.clone());
            // Counted when the work ends, or is dropped: a request its client gave up on
            // may be dropped unfinished (see `RunToEnd`), and must not leave its
            // connection busy for ever.
            let answered = Answered(requests.clone());
            RunToEnd::new(async move {
                let _answered = answered;
                proxy.handle(req, client).await
            })
        }
    };
    let stream = Progress {
        io: stream,
        writes: writes.clone(),
        unread: Bytes::new(),
    };
    let limits = Limits {
        header_read: request_every,
        max_head: periods.max_head,
    };
    let graceful = Graceful::default();
    let conn = drive(
        stream,
        service,
        builder,
        (limits, periods.client_body),
        graceful.clone(),
    );
    tokio::pin!(conn);
    // The timer and the shutdown signal are watched by a task of their own, which sends
    // its verdict once: the connection's task, woken several times per request, then
    // polls one channel instead of a timer and a cancellation token each time.
    let (verdict, mut decided) = oneshot::channel();
    let watcher = tokio::spawn(watch_connection(
        requests,
        writes.clone(),
        (request_every, client_send),
        closing,
        verdict,
    ));
    let end = tokio::select! {
        biased;
        result = conn.as_mut() => {
            if let Err(e) = result {
                match e.downcast_ref::<hyper::Error>().and_then(|e| Some((parser_answer(e)?, e))) {
                    // hyper answered it (and closed): a request all the same.
                    Some((status, e)) => refusals.refused_by_parser(status, &e.to_string()),
                    None => tracing::debug!(%peer, "connection ended: {e}"),
                }
            }
            None
        }
        end = &mut decided => end.ok(),
    };
    watcher.abort();
    match end {
        None => return,
        Some(End::Drop) => {
            tracing::debug!(%peer, "no request within timeouts.header_read: closing");
            return;
        }
        Some(End::Stalled) => {
            tracing::debug!(%peer, "the client read nothing for timeouts.client_send: closing");
            return;
        }
        Some(End::Quiet) => tracing::debug!(%peer, "idle for timeouts.header_read: closing"),
        Some(End::Shutdown) => {}
    }
    graceful.begin();
    // What is in flight may finish, as long as it moves: a client that stops reading
    // would otherwise hold the connection (and a response) for ever. Waiting for the
    // application (a long poll) is not that: then the proxy has nothing to write.
    let mut period =
        tokio::time::interval_at(tokio::time::Instant::now() + client_send, client_send);
    // A worker busy past a tick must not make up for it with two checks in a row.
    period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = writes.answer_progress();
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = period.tick() => {
                let now = writes.answer_progress();
                if now == seen && writes.stalled() {
                    tracing::debug!(%peer, "the client read nothing for timeouts.client_send: closing");
                    return;
                }
                seen = now;
            }
        }
    }
}

/// Serves a connection through the proxy's own HTTP/1.1 while its requests are simple,
/// then through hyper (HTTP/1.1 or HTTP/2) once one is not. `graceful` asks it to finish
/// what is in flight and close.
async fn drive<S, F>(
    mut io: Progress,
    service: S,
    builder: &auto::Builder<TokioExecutor>,
    (limits, body_gap): (Limits, Duration),
    graceful: Graceful,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: Fn(http::Request<ClientBody>) -> F + Clone + Send + 'static,
    F: Future<Output = http::Response<ProxyBody>> + Send + 'static,
{
    let (read, served, ended) =
        match http1::server::serve(&mut io, &service, limits, &graceful).await {
            Next::Done => return Ok(()),
            Next::Handover {
                read,
                served,
                ended,
            } => (read, served, ended),
        };
    let writes = io.writes.clone();
    let hyper_service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let writes = writes.clone();
        service(req.map(|body| Either::Left(Paced::new(body, body_gap)))).map(move |response| {
            Ok::<_, Infallible>(response.map(|body| AnswerFrames { body, writes }))
        })
    });
    // After HTTP/1.1 requests, an HTTP/2 preface is no longer one (RFC 9113 §3.4): the
    // connection closes rather than turn into HTTP/2 half-way.
    if served && read.starts_with(b"PRI * HTTP/2.0") {
        return Ok(());
    }
    io.unread = read;
    let io = TokioIo::new(io);
    // A client that closed its side behind requests still to answer gets their answers,
    // as the proxy's own HTTP/1.1 gives them (hyper would take the end of its requests
    // for the client leaving).
    let half_closed = ended.then(|| {
        let mut builder = builder.clone();
        builder.http1().half_close(true);
        builder
    });
    let conn = half_closed
        .as_ref()
        .unwrap_or(builder)
        .serve_connection_with_upgrades(io, hyper_service);
    tokio::pin!(conn);
    tokio::select! {
        biased;
        result = conn.as_mut() => return result,
        _ = graceful.begun() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// The requests of a client connection: how many the proxy began to handle, and how many
/// of those it has answered (the response head is ready; its body may still stream).
#[derive(Default)]
struct Requests {
    started: AtomicU64,
    answered: AtomicU64,
}

/// Counts its request answered when dropped.
struct Answered(Arc<Requests>);

impl Drop for Answered {
    fn drop(&mut self) {
        self.0.answered.fetch_add(1, Ordering::Relaxed);
    }
}

/// What became of the writes to a client connection.
#[derive(Default)]
struct Writes {
    /// Bytes written so far.
    written: AtomicU64,
    /// Frames of response bodies hyper has taken to send so far.
    answer_frames: AtomicU64,
    /// The last write found the socket full: the client is not reading (yet).
    blocked: AtomicBool,
    /// The connection speaks HTTP/2.
    http2: AtomicBool,
}

impl Writes {
    /// Whether a connection that wrote nothing for a while did so because of its client.
    /// Over HTTP/1 only a full socket says so: the proxy may just be waiting for the
    /// application. Over HTTP/2 a client that gives no flow-control window keeps the
    /// socket empty, so nothing written at all counts (a long poll over an HTTP/2
    /// connection that is closing then gets `timeouts.client_send`).
    fn stalled(&self) -> bool {
        self.blocked.load(Ordering::Relaxed) || self.http2.load(Ordering::Relaxed)
    }

    /// A count that moves while answers are being sent. Over HTTP/1 every byte written
    /// belongs to an answer. Over HTTP/2 the proxy also writes on its own (it
    /// acknowledges a client's PINGs and SETTINGS), which a client could call for for
    /// ever without asking anything: there the frames of response bodies count.
    fn answer_progress(&self) -> u64 {
        if self.http2.load(Ordering::Relaxed) {
            self.answer_frames.load(Ordering::Relaxed)
        } else {
            self.written.load(Ordering::Relaxed)
        }
    }
}

/// A response body served by hyper, counting its frames in [`Writes`] as hyper takes
/// them to send.
struct AnswerFrames {
    body: ProxyBody,
    writes: Arc<Writes>,
}

impl hyper::body::Body for AnswerFrames {
    type Data = Bytes;
    type Error = <ProxyBody as hyper::body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &frame {
            self.writes.answer_frames.fetch_add(1, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A client connection that keeps [`Writes`], so that a response the client has stopped
/// reading can be told from one still on its way, or one not ready to be written.
struct Progress {
    io: TcpStream,
    writes: Arc<Writes>,
    /// Bytes already read that are to be read again first: what the proxy's own
    /// HTTP/1.1 read before it handed the connection to hyper.
    unread: Bytes,
}

impl Progress {
    fn count(&self, result: &Poll<std::io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(n)) => {
                self.writes.written.fetch_add(*n as u64, Ordering::Relaxed);
                self.writes.blocked.store(false, Ordering::Relaxed);
            }
            Poll::Pending => self.writes.blocked.store(true, Ordering::Relaxed),
            Poll::Ready(Err(_)) => {}
        }
    }
}

impl tokio::io::AsyncRead for Progress {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            bytes::Buf::advance(&mut self.unread, n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Progress {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.count(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.count(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The timeouts a client connection is watched with.
#[derive(Clone, Copy)]
struct Periods {
    /// `timeouts.header_read`: a connection must bring a request at least this often.
    request_every: Duration,
    /// `timeouts.client_send`: a response left unread this long ends its connection.
    client_send: Duration,
    /// `timeouts.client_body`: a request body that pauses this long is cut off.
    client_body: Duration,
    /// A request head may be at most this long (hyper's backstop to
    /// `limits.max_header_bytes`).
    max_head: usize,
}

/// How a connection that is still open is ended.
enum End {
    /// It never brought a request: dropped.
    Drop,
    /// It went quiet: asked to finish what is in flight.
    Quiet,
    /// The proxy is shutting down: asked to finish what is in flight.
    Shutdown,
    /// Its client left a response unread for `timeouts.client_send`: dropped.
    Stalled,
}

/// Watches a connection for its verdict: `Drop` when it brought no request within
/// `request_every`, `Quiet` once a whole `request_every` passed in which it was idle (no
/// new request, none being answered, no answer streaming: an idle keep-alive
/// connection lasts between one and about one and a half of that, counted from its last
/// answer, however long that took), `Stalled` when the client has left a response
/// unread (the socket full) for `client_send`, and `Shutdown` when the proxy is closing.
/// Checked every quarter of the shorter period.
async fn watch_connection(
    requests: Arc<Requests>,
    writes: Arc<Writes>,
    (request_every, client_send): (Duration, Duration),
    closing: CancellationToken,
    verdict: oneshot::Sender<End>,
) {
    let tick = request_every.min(client_send) / CHECKS_PER_PERIOD;
    let tick = tick.max(Duration::from_millis(1));
    let mut period = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut last_busy) = (0, tokio::time::Instant::now());
    // Any write (the client reads), and the progress of answers.
    let (mut written, mut last_write) = (0, tokio::time::Instant::now());
    let (mut answering, mut last_answer) = (0, tokio::time::Instant::now());
    let end = loop {
        tokio::select! {
            _ = closing.cancelled() => break End::Shutdown,
            _ = period.tick() => {
                let now = tokio::time::Instant::now();
                let count = requests.started.load(Ordering::Relaxed);
                // A request the application is still working on (a slow answer, a long
                // poll) keeps the connection busy, and with it those pipelined behind it.
                if count != seen || count != requests.answered.load(Ordering::Relaxed) {
                    (seen, last_busy) = (count, now);
                }
                let bytes = writes.written.load(Ordering::Relaxed);
                if bytes != written {
                    (written, last_write) = (bytes, now);
                }
                // An answer still streaming keeps its connection busy.
                let progress = writes.answer_progress();
                if progress != answering {
                    answering = progress;
                    if count > 0 {
                        last_answer = now;
                    }
                }
                if writes.blocked.load(Ordering::Relaxed)
                    && now.duration_since(last_write) >= client_send
                {
                    break End::Stalled;
                }
                // A response the client is not reading is not idleness: `client_send`
                // decides for it, above.
                if now.duration_since(last_busy.max(last_answer)) >= request_every
                    && !writes.blocked.load(Ordering::Relaxed)
                {
                    break if count == 0 { End::Drop } else { End::Quiet };
                }
            }
        }
    };
    let _ = verdict.send(end);
}

/// How often a connection's watcher looks, per `timeouts.header_read` (or
/// `timeouts.client_send`, when shorter).
const CHECKS_PER_PERIOD: u32 = 4;

/// The store as the start-up line names it, in fields without spaces: its kind
/// (`memory`, `redis`, `redis-sentinel`, `redis-cluster`), a Sentinel setup's master, and
/// where Redis is (its URL, or the nodes' URLs joined by `,`), passwords masked.
struct StoreAt<'a> {
    kind: &'static str,
    master: Option<&'a str>,
    at: Option<String>,
}

impl StoreAt<'_> {
    fn of(store: &StoreConfig) -> StoreAt<'_> {
        let nodes = |nodes: &[String]| {
            let masked: Vec<String> = nodes.iter().map(|n| mask_url(n)).collect();
            Some(masked.join(","))
        };
        let (kind, master, at) = match (store.kind, &store.url, &store.sentinel, &store.cluster) {
            (StoreType::Memory, ..) => ("memory", None, None),
            (StoreType::Redis, Some(url), _, _) => ("redis", None, Some(mask_url(url))),
            (StoreType::Redis, None, Some(s), _) => {
                ("redis-sentinel", Some(s.master.as_str()), nodes(&s.nodes))
            }
            (StoreType::Redis, None, None, Some(c)) => ("redis-cluster", None, nodes(&c.nodes)),
            (StoreType::Redis, None, None, None) => ("redis", None, None),
        };
        StoreAt { kind, master, at }
    }
}

/// The configured backend, ready to serve requests on `workers` worker threads.
pub async fn build_store(config: &Config, workers: usize) -> Result<Arc<dyn Store>, String> {
    let settings = StoreSettings {
        max_age: Duration::from_secs(config.session.max_age),
        user_key: config.session.user_key.clone(),
        max_bytes: config.session.max_bytes,
    };
    let st = &config.store;
    if st.kind == StoreType::Memory {
        let store = Arc::new(MemoryStore::new(settings, st.max_sessions));
        store.start_sweeper();
        return Ok(store);
    }
    let topology = match (&st.url, &st.sentinel, &st.cluster) {
        (Some(url), _, _) => Topology::Standalone { url: url.clone() },
        (_, Some(s), _) => Topology::Sentinel {
            master: s.master.clone(),
            nodes: s.nodes.clone(),
        },
        (_, _, Some(c)) => Topology::Cluster {
            nodes: c.nodes.clone(),
        },
        _ => {
            return Err(
                "store.type is redis but no store.url, store.sentinel or store.cluster is set"
                    .into(),
            );
        }
    };
    let options = RedisOptions {
        key_prefix: st.key_prefix.clone(),
        connect_timeout: secs(st.connect_timeout),
        response_timeout: secs(st.response_timeout),
        workers,
    };
    let store = Arc::new(
        RedisStore::connect(topology, options, settings)
            .await
            .map_err(|e| format!("{e} (check store.url / store.sentinel / store.cluster)"))?,
    );
    tokio::spawn({
        let store = store.clone();
        async move { store.warn_if_evicting().await }
    });
    Ok(store)
}

/// A request's work, run to its end even when the client goes away first. hyper drops
/// the request's future when its client disconnects, but the application may already
/// have acted on the request and answered with a session change (a logout, say): the
/// rest of the work, the change included, then goes on in a task of its own, among the
/// worker's [`Leftovers`].
struct RunToEnd<F: Future + Send + 'static>(Option<Pin<Box<F>>>);

/// Requests whose clients left before the answer, still running. At most
/// `limits.max_connections` at a time (past that, a left request ends with its client,
/// so clients that connect, ask and hang up in a loop cannot pile up work), and the
/// shutdown waits for them as for requests still connected.
struct Leftovers {
    tasks: TaskTracker,
    permits: Arc<Semaphore>,
}

impl<F: Future + Send + 'static> RunToEnd<F> {
    fn new(work: F) -> RunToEnd<F> {
        RunToEnd(Some(Box::pin(work)))
    }
}

impl<F: Future + Send + 'static> Future for RunToEnd<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(work) = self.0.as_mut() else {
            return Poll::Pending;
        };
        let output = std::task::ready!(work.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for RunToEnd<F> {
    fn drop(&mut self) {
        let Some(work) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        LEFTOVERS.with(|leftovers| {
            let Some(leftovers) = leftovers.get() else {
                return;
            };
            let Ok(permit) = leftovers.permits.clone().try_acquire_owned() else {
                tracing::debug!("too many requests left by their clients: one more ends now");
                return;
            };
            let finish = async move {
                work.await;
                drop(permit);
            };
            leftovers.tasks.spawn_on(finish, &runtime);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterConfig, SentinelConfig};

    #[test]
    fn the_start_up_line_masks_every_redis_password() {
        let mut store = StoreConfig {
            kind: StoreType::Redis,
            sentinel: Some(SentinelConfig {
                master: "mymaster".into(),
                nodes: vec!["redis://:pw@10.0.0.5:26379".into(), "10.0.0.6:26379".into()],
            }),
            ..StoreConfig::default()
        };
        let at = StoreAt::of(&store);
        assert_eq!(at.kind, "redis-sentinel");
        assert_eq!(at.master, Some("mymaster"));
        assert_eq!(
            at.at.as_deref(),
            Some("redis://:********@10.0.0.5:26379,10.0.0.6:26379")
        );
        store.sentinel = None;
        store.cluster = Some(ClusterConfig {
            nodes: vec!["redis://u:pw@10.0.0.5:7000".into()],
        });
        let at = StoreAt::of(&store);
        assert_eq!(
            (at.kind, at.at.as_deref()),
            ("redis-cluster", Some("redis://u:********@10.0.0.5:7000"))
        );
    }
}
