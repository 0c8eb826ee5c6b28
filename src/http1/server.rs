//! A client connection served by the proxy's own HTTP/1.1 for as long as its requests
//! are simple: HTTP/1.1, no body, no upgrade, a path as the target. The first request
//! that is not (or that this parser cannot read) hands the connection to hyper, bytes
//! already read included, and hyper serves it from then on: bodies, `Expect`, upgrades,
//! HTTP/2 and every error answer about a malformed request stay hyper's.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::{FieldAt, MAX_HEADERS, chunked, connection_has, content_length, header_map, locate};
use crate::upstream::{ClientBody, ProxyBody};

/// How the connection went on.
pub enum Next {
    /// It ended: closed by the client, timed out, or finished after a shutdown.
    Done,
    /// A request this side does not serve arrived: hyper takes over.
    Handover {
        /// Bytes read but not yet served.
        read: Bytes,
        /// Requests were served before it: the connection is HTTP/1.1 for good (an
        /// HTTP/2 preface must come first).
        served: bool,
        /// The client has closed its side after sending them: they are still to be
        /// answered.
        ended: bool,
    },
}

/// Asks a connection to finish what is in flight and close. Checked once per request, so
/// a flag rather than a cancellation token (whose check takes a lock).
#[derive(Clone, Default)]
pub struct Graceful(Arc<(AtomicBool, Notify)>);

impl Graceful {
    pub fn begin(&self) {
        self.0.0.store(true, Ordering::Release);
        self.0.1.notify_waiters();
    }

    pub fn is_begun(&self) -> bool {
        self.0.0.load(Ordering::Acquire)
    }

    /// Completes once [`Graceful::begin`] has been called.
    pub async fn begun(&self) {
        loop {
            let notified = self.0.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_begun() {
                return;
            }
            notified.await;
        }
    }
}

/// The limits a connection is served with.
#[derive(Clone, Copy)]
pub struct Limits {
    /// A request head must arrive whole within this time of its first byte.
    pub header_read: Duration,
    /// A head still incomplete at this many bytes goes to hyper, which refuses it.
    pub max_head: usize,
}

/// Bytes of body gathered into one write with the head, at most.
const GATHER: usize = 64 * 1024;

/// Serves requests until the connection ends or one needs hyper. `graceful` asks it to
/// finish the request in flight, if any, and close.
pub async fn serve<I, S, F>(io: &mut I, service: &S, limits: Limits, graceful: &Graceful) -> Next
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Fn(Request<ClientBody>) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(1024);
    // One wait for the whole connection, polled between requests.
    let finishing = graceful.begun();
    tokio::pin!(finishing);
    // The client closed its side with requests still buffered: they are answered, then
    // the connection closes.
    let mut ended = false;
    let mut served = false;
    loop {
        // A head must arrive whole within `header_read` of its first byte, however it
        // trickles in.
        let mut deadline = None;
        let (request, close) = loop {
            match parse(&mut buf) {
                Parsed::Request(request, close) => break (request, close),
                Parsed::Other => return handover(buf, served, ended),
                Parsed::Partial if buf.len() >= limits.max_head => {
                    return handover(buf, served, ended);
                }
                Parsed::Partial if ended => return Next::Done,
                Parsed::Partial => {}
            }
            buf.reserve(4096);
            let read = if buf.is_empty() {
                // Between requests: the connection's watcher decides how long it may idle.
                tokio::select! {
                    read = io.read_buf(&mut buf) => read,
                    _ = &mut finishing => return Next::Done,
                }
            } else {
                let deadline = *deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + limits.header_read);
                tokio::select! {
                    read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)) => match read {
                        Ok(read) => read,
                        Err(_) => return Next::Done,
                    },
                    // Shutting down: a head still on its way is not waited for.
                    _ = &mut finishing => return Next::Done,
                }
            };
            match read {
                Ok(0) | Err(_) => return Next::Done,
                Ok(_) => {}
            }
        };
        served = true;
        let head_only = request.method() == Method::HEAD;
        let mut work = std::pin::pin!(service(request));
        // The client is watched while the application works, as hyper does: one that
        // closes its side has left, and the request's work goes on without it (the
        // service hands it on when dropped), unless it sent further requests first.
        // Bytes it sends meanwhile (the next request, pipelined) are kept, up to the
        // head limit.
        let response = loop {
            buf.reserve(4096);
            tokio::select! {
                biased;
                response = &mut work => break response,
                read = io.read_buf(&mut buf), if !ended && buf.len() < limits.max_head => {
                    match watched(read, &buf, &mut ended) {
                        Watched::Left => return Next::Done,
                        Watched::Stays => {}
                    }
                }
            }
        };
        let close = close || graceful.is_begun() || connection_has(response.headers(), "close");
        out.clear();
        let mut client = Client {
            buf: &mut buf,
            max_head: limits.max_head,
            ended: &mut ended,
        };
        if write_response(io, &mut out, response, head_only, close, &mut client)
            .await
            .is_err()
            || close
        {
            let _ = io.shutdown().await;
            return Next::Done;
        }
        // A large answer or head leaves large buffers behind: an idle connection keeps
        // small ones.
        if out.capacity() > KEEP_CAPACITY {
            out = Vec::with_capacity(1024);
        }
        if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
            buf = BytesMut::with_capacity(4096);
        }
    }
}

fn handover(buf: BytesMut, served: bool, ended: bool) -> Next {
    Next::Handover {
        read: buf.freeze(),
        served,
        ended,
    }
}

/// Buffers larger than this are not kept between requests.
const KEEP_CAPACITY: usize = 16 * 1024;

/// What a read from the client while a request is in flight says of it.
enum Watched {
    /// It is gone (closed its side with nothing buffered, or the connection failed).
    Left,
    /// It is still there, or closed its side after sending requests still to answer.
    Stays,
}

fn watched(read: std::io::Result<usize>, buf: &BytesMut, ended: &mut bool) -> Watched {
    match read {
        Ok(0) if !buf.is_empty() => {
            *ended = true;
            Watched::Stays
        }
        Ok(0) | Err(_) => Watched::Left,
        Ok(_) => Watched::Stays,
    }
}

/// The client side of a connection while a response is written: where what it sends
/// meanwhile goes, and whether it has closed its side.
struct Client<'a> {
    buf: &'a mut BytesMut,
    max_head: usize,
    ended: &'a mut bool,
}

#[expect(
    clippy::large_enum_variant,
    reason = "made once per request and moved on at once: boxing would cost an allocation"
)]
pub enum Parsed {
    /// A request this side serves, and whether its client asked to close after it.
    Request(Request<ClientBody>, bool),
    /// More bytes are needed.
    Partial,
    /// Anything else: hyper's.
    Other,
}

/// Reads a request head from the start of `buf`, taking it out when this side serves the
/// request; anything else is left in `buf` for hyper.
pub fn parse(buf: &mut BytesMut) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    // Not cleared first: httparse writes each field it parses.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let mut at = [FieldAt::default(); MAX_HEADERS];
    let (len, method, target, count) = match parsed.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => {
            let (Some(1), Some(method), Some(path)) = (parsed.version, parsed.method, parsed.path)
            else {
                return Parsed::Other;
            };
            if !path.starts_with('/') {
                return Parsed::Other;
            }
            let Ok(method) = Method::from_bytes(method.as_bytes()) else {
                return Parsed::Other;
            };
            if !served_here(parsed.headers) {
                return Parsed::Other;
            }
            locate(buf, parsed.headers, &mut at);
            let start = path.as_ptr() as usize - buf.as_ptr() as usize;
            (
                len,
                method,
                (start, start + path.len()),
                parsed.headers.len(),
            )
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let head = buf.split_to(len).freeze();
    // Room for the fields the proxy adds on the way (`X-Forwarded-*`, the session's).
    let parts = header_map(&head, &at[..count], 6)
        .zip(Uri::from_maybe_shared(head.slice(target.0..target.1)).ok());
    let Some((headers, uri)) = parts else {
        // A field or target `http`'s types refuse: the head goes back for hyper to answer.
        let mut again = BytesMut::with_capacity(head.len() + buf.len());
        again.extend_from_slice(&head);
        again.extend_from_slice(buf);
        *buf = again;
        return Parsed::Other;
    };
    let close = connection_has(&headers, "close");
    let mut request = Request::new(Either::Right(Empty::new()));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Request(request, close)
}

/// Whether the request's fields leave it to this side: each [`plain`], and at most one
/// `Content-Length` (hyper merges a repeated one before the application sees it).
fn served_here(fields: &[httparse::Header<'_>]) -> bool {
    let mut lengths = 0;
    fields.iter().all(|field| {
        lengths += usize::from(field.name.eq_ignore_ascii_case("content-length"));
        lengths <= 1 && plain(field)
    })
}

/// Whether a request header field leaves the request to this side: not one that gives it
/// a body (`Transfer-Encoding`, a `Content-Length` other than 0), asks for an upgrade
/// (WebSocket, h2c), an interim answer (`Expect`) or trailers (`TE`).
fn plain(field: &httparse::Header<'_>) -> bool {
    let name = field.name.as_bytes();
    if name.eq_ignore_ascii_case(b"content-length") {
        return field.value.trim_ascii() == b"0";
    }
    ![&b"transfer-encoding"[..], b"upgrade", b"expect", b"te"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
}

/// Writes a response: the head, then the body framed by its length, or chunked when
/// the length is not known. An error means the connection cannot go on.
async fn write_response<I: AsyncRead + AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    response: Response<ProxyBody>,
    head_only: bool,
    close: bool,
    client: &mut Client<'_>,
) -> std::io::Result<()> {
    let (mut parts, mut body) = response.into_parts();
    let status = parts.status;
    let bodiless = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        parts.headers.remove(CONTENT_LENGTH);
    }
    parts.headers.remove(TRANSFER_ENCODING);
    let declared = content_length(&parts.headers).map_err(std::io::Error::other)?;
    let may_have_length = !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED);
    let length = match (declared, body.size_hint().exact()) {
        (Some(n), _) => Some(n),
        // As hyper does: a length the body knows is sent, except a zero for `HEAD`
        // (the answer to a `GET` may have had a body).
        (None, Some(n)) if may_have_length && !(head_only && n == 0) => {
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
            Some(n)
        }
        _ => None,
    };
    let chunked = !bodiless && length.is_none();
    if chunked {
        parts
            .headers
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    if close && !connection_has(&parts.headers, "close") {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    // The application's own reason phrase when it had one, as hyper passes it on.
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    super::write_headers(out, &parts.headers);
    if !parts.headers.contains_key(DATE) {
        out.extend_from_slice(b"date: ");
        date::with(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        return io.write_all(out).await;
    }

    let mut left = length;
    loop {
        // A frame ready now goes into the same write as what is gathered; one not ready
        // yet (an application still working on its body) waits until what is gathered
        // has gone out.
        let frame = match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)))
            .await
        {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    io.write_all(out).await?;
                    out.clear();
                }
                // While the application is slow to send its body (a stream, a long
                // poll), a client that leaves ends the response, as under hyper.
                loop {
                    client.buf.reserve(4096);
                    let reading = !*client.ended && client.buf.len() < client.max_head;
                    tokio::select! {
                        biased;
                        frame = body.frame() => break frame,
                        read = io.read_buf(client.buf), if reading => {
                            match watched(read, client.buf, client.ended) {
                                Watched::Left => {
                                    return Err(std::io::Error::other("the client left"));
                                }
                                Watched::Stays => {}
                            }
                        }
                    }
                }
            }
        };
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                // The head and what came of the body still go out: the client sees the
                // body break off, not a connection closed without an answer.
                if !out.is_empty() {
                    io.write_all(out).await?;
                }
                return Err(std::io::Error::other(e));
            }
        };
        let Ok(data) = frame.into_data() else {
            // Trailers: only hyper passes them on, to clients that ask (`TE: trailers`),
            // and those requests are hyper's.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if let Some(left) = &mut left {
            // More than the length said: the response cannot be framed.
            *left = left
                .checked_sub(data.len() as u64)
                .ok_or_else(|| std::io::Error::other("a body longer than its Content-Length"))?;
        }
        if chunked {
            chunked::chunk_head(out, data.len());
        }
        if out.len() + data.len() <= GATHER {
            out.extend_from_slice(&data);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
        } else {
            write_all_vectored(io, out, &data).await?;
            out.clear();
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    if left.is_some_and(|l| l > 0) {
        // Shorter than its length: the client must not wait for the rest.
        if !out.is_empty() {
            io.write_all(out).await?;
        }
        return Err(std::io::Error::other(
            "a body shorter than its Content-Length",
        ));
    }
    if chunked {
        chunked::last_chunk(out, None);
    }
    if !out.is_empty() {
        io.write_all(out).await?;
    }
    Ok(())
}

/// Writes `first` then `second`, in as few system calls as the socket takes.
async fn write_all_vectored<I: AsyncWrite + Unpin>(
    io: &mut I,
    first: &[u8],
    second: &Bytes,
) -> std::io::Result<()> {
    let (mut a, mut b) = (first, &second[..]);
    while !a.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    io.write_all(b).await
}

/// The `Date` header's value, formatted once per second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn with(f: impl FnOnce(&[u8])) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second || cached.1.is_empty() {
                *cached = (second, httpdate::fmt_http_date(now));
            }
            f(cached.1.as_bytes());
        });
    }
}
