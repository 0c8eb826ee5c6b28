//! A keep-alive HTTP/1.1 connection to the application for requests without a body: the
//! request head goes out in one write, the answer's head is parsed here and its body
//! read straight from the socket by whoever streams it to the client.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::TRANSFER_ENCODING;
use http::{HeaderMap, StatusCode, Version, request, response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::chunked::Decoder;
use super::{FieldAt, MAX_HEADERS, connection_has, content_length, header_map, locate};

/// An answer's head may be at most this long, as hyper's client allows by default; more
/// when the largest session's update header needs it (see [`head_limit`]).
pub const MAX_HEAD: usize = 8192 + 4096 * 100;

/// The longest answer head taken from the application: room for an update header
/// carrying a session of `max_bytes` (base64 makes it a third longer) beside the
/// application's other fields.
pub fn head_limit(max_bytes: usize) -> usize {
    MAX_HEAD.max(
        max_bytes
            .div_ceil(3)
            .saturating_mul(4)
            .saturating_add(64 * 1024),
    )
}
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// An open connection to the application, between requests.
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// Where each request head is written, reused from one request to the next.
    out: Vec<u8>,
    /// The longest answer head taken.
    max_head: usize,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failure {
    /// The request could not be written: the application has not seen it.
    Unsent(String),
    /// The connection ended before any byte of an answer: the application may not have
    /// seen the request either.
    Closed(String),
    /// The answer broke off or broke the protocol.
    Broken(String),
}

impl Conn {
    pub fn new(io: TcpStream, max_head: usize) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            max_head,
        }
    }

    /// Whether the application closed this idle connection, or sent on it unasked, as far
    /// as can be told without waiting: no system call unless the socket became readable.
    pub fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.io.poll_read_ready(&mut cx).is_pending() {
            return false;
        }
        let mut probe = [0u8; 1];
        !matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends a request without a body and reads the answer's head, past any interim (1xx)
    /// answers.
    pub async fn exchange(
        mut self,
        request: &request::Parts,
    ) -> Result<(response::Parts, Reader), Failure> {
        // The answer to `HEAD` has no body, whatever its head says.
        let bodiless = request.method == http::Method::HEAD;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        encode_request(&mut out, request);
        let written = self.io.write_all(&out).await;
        self.out = out;
        if let Err(e) = written {
            return Err(Failure::Unsent(format!("cannot send the request: {e}")));
        }
        let mut interim = false;
        loop {
            let answer = parse_answer(&mut self.buf, bodiless, self.max_head, &mut interim);
            match answer.map_err(Failure::Broken)? {
                Some(Answer {
                    head,
                    framing,
                    keep_alive,
                }) => {
                    let reader = Reader {
                        conn: Some(self),
                        framing,
                        keep_alive,
                        ended: false,
                    };
                    return Ok((head, reader));
                }
                None if self.buf.len() > self.max_head => {
                    return Err(Failure::Broken(format!(
                        "the application's response head is longer than {} bytes",
                        self.max_head
                    )));
                }
                None => {}
            }
            self.buf.reserve(READ_SIZE);
            let read = self.io.read_buf(&mut self.buf).await;
            let nothing_yet = self.buf.is_empty() && !interim;
            match read {
                Ok(0) if nothing_yet => {
                    return Err(Failure::Closed(
                        "the application closed the connection before answering".into(),
                    ));
                }
                Ok(0) => {
                    return Err(Failure::Broken(
                        "the application closed the connection in the middle of its response head"
                            .into(),
                    ));
                }
                Ok(_) => {}
                Err(e) if nothing_yet => {
                    return Err(Failure::Closed(format!("connection error: {e}")));
                }
                Err(e) => return Err(Failure::Broken(format!("connection error: {e}"))),
            }
        }
    }
}

/// An answer's head, parsed.
pub struct Answer {
    pub head: response::Parts,
    framing: Framing,
    /// Whether the connection can carry another request once the body has been read.
    pub keep_alive: bool,
}

impl Answer {
    /// The body's length, when the head gives it (0 for an answer without a body); `None`
    /// for a chunked body or one that ends when the connection closes.
    pub fn length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }
}

/// Parses the answer's head at the start of `buf` and takes it out, past any interim
/// (1xx) answers (`interim` is set when one was taken). `Ok(None)`: more bytes are needed.
/// `bodiless` says the answer has no body whatever its head says (an answer to `HEAD`);
/// a head longer than `max_head` is refused.
pub fn parse_answer(
    buf: &mut BytesMut,
    bodiless: bool,
    max_head: usize,
    interim: &mut bool,
) -> Result<Option<Answer>, String> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        let mut at = [FieldAt::default(); MAX_HEADERS];
        let (len, code, version, count, reason) = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                locate(buf, parsed.headers, &mut at);
                let code = parsed.code.unwrap_or_default();
                let reason = parsed.reason.filter(|r| {
                    !r.is_empty()
                        && StatusCode::from_u16(code)
                            .map_or(true, |s| s.canonical_reason() != Some(*r))
                });
                // Kept, as hyper keeps it, to be passed on to the client.
                let reason =
                    reason.and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes()).ok());
                (len, code, parsed.version, parsed.headers.len(), reason)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("the application's response head is malformed: {e}")),
        };
        // A read may bring more than the limit at once: the head itself is measured.
        if len > max_head {
            return Err(format!(
                "the application's response head is longer than {max_head} bytes"
            ));
        }
        let head = buf.split_to(len).freeze();
        let status = StatusCode::from_u16(code)
            .map_err(|_| format!("the application answered with status {code}"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            *interim = true;
            continue;
        }
        // Room for the cookie and caching fields the proxy may add.
        let headers = header_map(&head, &at[..count], 2)
            .ok_or("the application's response has a malformed header field")?;
        let framing = framing(status, &headers, bodiless)?;
        let bodiless_by_rule =
            bodiless || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        // Not trusted with another request: see `announces_body`.
        let may_send_a_body = bodiless_by_rule && super::announces_body(&headers);
        let keep_alive = version == Some(1)
            && !may_send_a_body
            && !connection_has(&headers, "close")
            && !matches!(framing, Framing::Close)
            && status != StatusCode::SWITCHING_PROTOCOLS;
        let mut parts = response::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = if version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        parts.headers = headers;
        if let Some(reason) = reason {
            parts.extensions.insert(reason);
        }
        return Ok(Some(Answer {
            head: parts,
            framing,
            keep_alive,
        }));
    }
}

/// How an answer's body is delimited (RFC 9112 §6.3).
enum Framing {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Decoder),
    /// Until the application closes the connection.
    Close,
}

fn framing(status: StatusCode, headers: &HeaderMap, bodiless: bool) -> Result<Framing, String> {
    if bodiless
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::SWITCHING_PROTOCOLS
    {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|c| !c.is_empty());
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => Framing::Chunked(Decoder::default()),
            _ => Framing::Close,
        });
    }
    match content_length(headers) {
        Ok(Some(n)) => Ok(Framing::Length(n)),
        Ok(None) => Ok(Framing::Close),
        Err(why) => Err(format!("the application's response has {why}")),
    }
}

/// The body of an answer, read from its connection as it is polled. Once read to the
/// end, the connection can be taken back for the next request ([`Reader::reusable`]).
pub struct Reader {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    ended: bool,
}

impl Reader {
    /// The connection, once the body has been read to its end, if it can carry another
    /// request.
    pub fn reusable(&mut self) -> Option<Conn> {
        if !(self.ended || self.is_end_stream()) || !self.keep_alive {
            return None;
        }
        self.conn.take().filter(|c| c.buf.is_empty())
    }

    fn fail(&mut self, why: impl Into<String>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn = None;
        Poll::Ready(Some(Err(io::Error::other(why.into()))))
    }
}

impl Body for Reader {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Length(0) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Framing::Length(left) if !conn.buf.is_empty() => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.buf.len());
                    *left -= n as u64;
                    let data = conn.buf.split_to(n).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Ok(None) if decoder.is_done() => {
                        this.ended = true;
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                    Err(why) => return this.fail(format!("the application's body: {why}")),
                },
                Framing::Close if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Length(_) | Framing::Close => {}
            }
            conn.buf.reserve(READ_SIZE);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buf
            ));
            match read {
                Ok(0) if matches!(this.framing, Framing::Close) => {
                    this.ended = true;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("the application closed the connection mid-body"),
                Ok(_) => {}
                Err(e) => return this.fail(format!("reading the application's body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            || match &self.framing {
                Framing::Length(left) => *left == 0,
                Framing::Chunked(decoder) => decoder.is_done(),
                Framing::Close => false,
            }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.framing {
            Framing::Length(left) => SizeHint::with_exact(*left),
            _ => SizeHint::default(),
        }
    }
}

/// Appends the head of a request without a body, as it goes to the application.
pub fn encode_request(out: &mut Vec<u8>, head: &request::Parts) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    super::write_headers(out, &head.headers);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    /// An application that answers the first request with `answer`, then keeps the
    /// connection open for a while, or closes it at once.
    async fn answering(answer: &'static [u8], keep_open: bool) -> Conn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(answer).await.unwrap();
            if keep_open {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
        Conn::new(TcpStream::connect(addr).await.unwrap(), MAX_HEAD)
    }

    fn get(method: &str) -> request::Parts {
        let request = http::Request::builder().method(method).uri("/").body(());
        request.unwrap().into_parts().0
    }

    async fn body_of(mut reader: Reader) -> Result<(Vec<u8>, Option<HeaderMap>, bool), io::Error> {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = reader.frame().await {
            match frame?.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        Ok((data, trailers, reader.reusable().is_some()))
    }

    #[tokio::test]
    async fn answers_are_framed_by_length_chunks_or_close() {
        let conn = answering(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", true).await;
        let (head, reader) = conn.exchange(&get("GET")).await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.headers["x-a"], "1");
        assert_eq!(
            body_of(reader).await.unwrap(),
            (b"hello".to_vec(), None, true)
        );

        let conn = answering(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 2\r\n\r\n",
            true,
        )
        .await;
        let (_, reader) = conn.exchange(&get("GET")).await.unwrap();
        let (data, trailers, reusable) = body_of(reader).await.unwrap();
        assert_eq!((data, reusable), (b"abc".to_vec(), true));
        assert_eq!(trailers.unwrap()["x-t"], "2");

        // No length: the body runs until the application closes; not reusable.
        let conn = answering(b"HTTP/1.1 200 OK\r\n\r\nuntil close", false).await;
        let (_, reader) = conn.exchange(&get("GET")).await.unwrap();
        assert_eq!(
            body_of(reader).await.unwrap(),
            (b"until close".to_vec(), None, false)
        );

        // An answer to HEAD has no body, whatever its Content-Length says; one that
        // announces a body may come from an application that sends it anyway, so its
        // connection is not reused. The same for a 204 or a 304.
        let conn = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).await;
        let (_, reader) = conn.exchange(&get("HEAD")).await.unwrap();
        assert_eq!(body_of(reader).await.unwrap(), (vec![], None, false));
        for (answer, method, reusable) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..],
                "HEAD",
                true,
            ),
            (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", true),
            (
                b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n",
                "GET",
                false,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n",
                "GET",
                true,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                "GET",
                false,
            ),
        ] {
            let conn = answering(answer, true).await;
            let (_, reader) = conn.exchange(&get(method)).await.unwrap();
            assert_eq!(
                body_of(reader).await.unwrap(),
                (vec![], None, reusable),
                "{method}: {}",
                String::from_utf8_lossy(answer)
            );
        }

        let conn = answering(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            true,
        )
        .await;
        let (_, reader) = conn.exchange(&get("GET")).await.unwrap();
        assert_eq!(
            body_of(reader).await.unwrap(),
            (b"hello".to_vec(), None, false)
        );
    }

    #[tokio::test]
    async fn broken_answers_are_failures_and_never_reused() {
        for (answer, closed) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
                false,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false),
            (b"HTTP/1.1 2000 Nope\r\n\r\n", false),
            (b"NOT HTTP\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nContent-", false),
            (b"", true),
        ] {
            let conn = answering(answer, false).await;
            match conn.exchange(&get("GET")).await {
                Err(Failure::Closed(_)) => assert!(closed, "{answer:?}"),
                Err(Failure::Broken(_)) => assert!(!closed, "{answer:?}"),
                other => panic!("{answer:?}: {:?}", other.map(|(h, _)| h.status)),
            }
        }
        // A body cut short is an error, and its connection is not reused.
        let conn = answering(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello!\r\n",
            true,
        )
        .await;
        let (_, mut reader) = conn.exchange(&get("GET")).await.unwrap();
        assert!(reader.frame().await.unwrap().is_ok());
        assert!(reader.frame().await.unwrap().is_err());
        assert!(reader.reusable().is_none());
    }

    #[test]
    fn a_head_over_the_limit_is_refused_even_when_it_arrived_whole() {
        let head = |value_len: usize| {
            let mut head = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
            head.resize(head.len() + value_len, b'a');
            head.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
            BytesMut::from(&head[..])
        };
        let mut interim = false;
        let mut over = head(MAX_HEAD);
        assert!(parse_answer(&mut over, false, MAX_HEAD, &mut interim).is_err());
        let mut under = head(MAX_HEAD - 100);
        assert!(matches!(
            parse_answer(&mut under, false, MAX_HEAD, &mut interim),
            Ok(Some(_))
        ));
    }
}
