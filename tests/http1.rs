//! The proxy's own HTTP/1.1 on the wire, both sides: the client connection (pipelining,
//! `HEAD`, framing of every kind of answer, `Date`, `Connection: close`, the hand-over
//! to hyper at the first request with a body) and the application connection (answers
//! framed by length, chunks or close, interim answers, `204` and `304`).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use support::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An application written by hand: it reads each request head (and a body of the
/// length it declares) and answers by path, on connections it keeps open unless the
/// answer is framed by closing.
async fn application() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

async fn serve(mut s: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut more = [0u8; 4096];
            match s.read(&mut more).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&more[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < length {
            let mut more = [0u8; 4096];
            match s.read(&mut more).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&more[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let mut line = head.split(' ');
        let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
        let answer = match path {
            "/len" if method == "head" => {
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_string()
            }
            "/len" => "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_string(),
            "/chunked" => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                           3;x=y\r\nabc\r\n4\r\ndefg\r\n0\r\nx-sum: 7\r\n\r\n"
                .to_string(),
            "/close" => "HTTP/1.1 200 OK\r\n\r\nuntil the end".to_string(),
            "/none" => "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
            "/same" => "HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n".to_string(),
            "/early" => "HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
                         HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                .to_string(),
            "/post" => format!(
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{:02}",
                body.len()
            ),
            "/reason" => "HTTP/1.1 599 Upstream Said So\r\ncontent-length: 2\r\n\r\nok".to_string(),
            // A length given twice, agreeing: in one field, or in two.
            "/length-list" if method == "head" => {
                "HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n".to_string()
            }
            "/length-list" => "HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\nabc".to_string(),
            "/length-twice" if method == "head" => {
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\n".to_string()
            }
            "/length-twice" => {
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc".to_string()
            }
            // A 204 has no body, whatever lengths it gives.
            "/none-lengths" => "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\
                                content-length: 1\r\n\r\n"
                .to_string(),
            // Chunk sizes with leading zeros, and long chunk extensions (5000 bytes each).
            "/zeros" => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                         000000000000000003\r\nabc\r\n00000000000000000000\r\n\r\n"
                .to_string(),
            "/extensions" | "/too-many-extensions" => {
                let chunks = if path == "/extensions" { 3 } else { 4 };
                let chunk = format!("1;x={}\r\na\r\n", "e".repeat(5000));
                format!(
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{}0\r\n\r\n",
                    chunk.repeat(chunks)
                )
            }
            // What the application received.
            "/head" => format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{head}",
                head.len()
            ),
            "/slow" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n/slow".to_string()
            }
            "/slower" => {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n/slower".to_string()
            }
            "/trickle" => {
                // Five chunks 250 ms apart, then the end.
                let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if s.write_all(b"1\r\n.\r\n").await.is_err() {
                        return;
                    }
                }
                "0\r\n\r\n".to_string()
            }
            other => format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{other}",
                other.len()
            ),
        };
        if s.write_all(answer.as_bytes()).await.is_err() || path == "/close" {
            return;
        }
    }
}

async fn proxy() -> Proxy {
    let app = application().await;
    Proxy::start(support::config(&format!("http://{app}"))).await
}

/// One client connection to the proxy, through hyper's client, which checks the framing
/// of every answer.
async fn connection(proxy: &Proxy) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &'static [u8],
) -> (http::response::Parts, Bytes, Option<http::HeaderMap>) {
    sender.ready().await.expect("the connection is still open");
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "app.test")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("a whole body");
    let trailers = collected.trailers().cloned();
    (parts, collected.to_bytes(), trailers)
}

#[tokio::test]
async fn every_kind_of_answer_is_framed_for_the_client_on_one_connection() {
    let proxy = proxy().await;
    let mut c = connection(&proxy).await;
    let (head, body, _) = send(&mut c, "GET", "/len", b"").await;
    assert_eq!((head.status.as_u16(), &body[..]), (200, &b"hello"[..]));
    assert_eq!(head.headers["content-length"], "5");
    assert!(head.headers.contains_key("date"), "{:?}", head.headers);

    // Chunked from the application: chunked to the client, extensions gone.
    let (head, body, trailers) = send(&mut c, "GET", "/chunked", b"").await;
    assert_eq!(&body[..], b"abcdefg");
    assert_eq!(head.headers["transfer-encoding"], "chunked");
    assert!(trailers.is_none(), "trailers only for clients that ask");

    // HEAD keeps the length and sends no body: the next answer is read cleanly.
    let (head, body, _) = send(&mut c, "HEAD", "/len", b"").await;
    assert_eq!(head.headers["content-length"], "5");
    assert!(body.is_empty());

    for (path, status) in [("/none", 204), ("/same", 304)] {
        let (head, body, _) = send(&mut c, "GET", path, b"").await;
        assert_eq!(head.status.as_u16(), status);
        assert!(body.is_empty());
        assert!(!head.headers.contains_key("transfer-encoding"), "{path}");
    }

    // The application's interim answer is not passed on; its final one is.
    let (head, body, _) = send(&mut c, "GET", "/early", b"").await;
    assert_eq!((head.status.as_u16(), &body[..]), (200, &b"ok"[..]));

    // An answer that ends when the application closes: chunked to the client, whose
    // connection stays open.
    let (head, body, _) = send(&mut c, "GET", "/close", b"").await;
    assert_eq!(&body[..], b"until the end");
    assert_eq!(head.headers["transfer-encoding"], "chunked");
    let (_, body, _) = send(&mut c, "GET", "/after-close", b"").await;
    assert_eq!(&body[..], b"/after-close");
}

#[tokio::test]
async fn a_connection_goes_on_through_hyper_from_its_first_request_with_a_body() {
    let proxy = proxy().await;
    let mut c = connection(&proxy).await;
    let (_, body, _) = send(&mut c, "GET", "/one", b"").await;
    assert_eq!(&body[..], b"/one");
    let (_, body, _) = send(&mut c, "POST", "/post", b"0123456789").await;
    assert_eq!(&body[..], b"10", "the body reached the application");
    for path in ["/two", "/chunked", "/len"] {
        let (head, _, _) = send(&mut c, "GET", path, b"").await;
        assert_eq!(head.status, 200, "{path}");
    }
    // A request with `Content-Length: 0` has no body: it stays with the proxy's own.
    let (_, body, _) = send(&mut c, "POST", "/post", b"").await;
    assert_eq!(&body[..], b"00");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let proxy = proxy().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut requests = Vec::new();
    for path in ["/first", "/second", "/third"] {
        requests.extend_from_slice(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes());
    }
    // All three in one write, then the next one split mid-head.
    s.write_all(&requests).await.unwrap();
    s.write_all(b"GET /fourth HTTP/1.1\r\nho").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"st: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let out = read_until_closed(
        &mut s,
        "the proxy closes after the request that asked it to",
    )
    .await;
    let bodies: Vec<&str> = out
        .split("HTTP/1.1 200 OK\r\n")
        .skip(1)
        .map(|answer| answer.split("\r\n\r\n").nth(1).unwrap())
        .collect();
    assert_eq!(bodies, ["/first", "/second", "/third", "/fourth"], "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "the last answer says the connection closes: {out}"
    );
}

#[tokio::test]
async fn requests_this_side_does_not_take_get_hyper_answers() {
    let proxy = proxy().await;
    // HTTP/1.0, a lenient request line, a malformed head: each is hyper's to answer,
    // the way it always did.
    for (request, status) in [
        (&b"GET /old HTTP/1.0\r\nhost: x\r\n\r\n"[..], "200"),
        (b"GET  /two-spaces HTTP/1.1\r\nhost: x\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", "400"),
        // A target httparse takes and `http` refuses: the head goes back to hyper whole.
        (b"GET /a`b HTTP/1.1\r\nhost: x\r\n\r\n", "400"),
        (
            b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            "400",
        ),
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&out[..n]);
        assert_eq!(
            answer.split(' ').nth(1),
            Some(status),
            "{}: {answer}",
            String::from_utf8_lossy(request)
        );
    }
}

#[tokio::test]
async fn an_answer_to_a_client_that_asks_to_close_says_so_and_closes() {
    let proxy = proxy().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /bye HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let out = read_until_closed(&mut s, "closed after the answer").await;
    let out = out.to_ascii_lowercase();
    assert!(out.starts_with("http/1.1 200 ok\r\n"), "{out}");
    assert!(out.contains("\r\nconnection: close\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\n/bye"), "{out}");
}

/// An application that answers the first request on its one connection with `answer`,
/// then (when `then_close`) closes its own side 100 ms later, and reports how long after
/// that the proxy closed the connection: nothing if it had not within 10 s.
async fn one_answer_app(
    answer: &'static [u8],
    then_close: bool,
) -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<Duration>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let (closed_after, closed) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        s.write_all(answer).await.unwrap();
        if then_close {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.shutdown().await.unwrap();
        }
        let started = tokio::time::Instant::now();
        let until_closed = async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} };
        if tokio::time::timeout(Duration::from_secs(10), until_closed)
            .await
            .is_ok()
        {
            let _ = closed_after.send(started.elapsed()).await;
        }
    });
    (app, closed)
}

#[tokio::test]
async fn a_pooled_connection_the_application_closes_is_closed_here_within_seconds() {
    // A pooled connection nothing reads must not sit half-closed until it is next taken.
    let (app, mut closed) =
        one_answer_app(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
    let proxy = Proxy::start(support::config(&format!("http://{app}"))).await;
    let mut c = connection(&proxy).await;
    let (head, body, _) = send(&mut c, "GET", "/", b"").await;
    assert_eq!((head.status.as_u16(), &body[..]), (200, &b"ok"[..]));
    let after = closed
        .recv()
        .await
        .expect("the proxy never closed its side");
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
}

/// Reads one answer framed by `Content-Length` from `s`; `pending` keeps what came after.
async fn read_answer(s: &mut TcpStream, pending: &mut Vec<u8>) -> (String, Vec<u8>) {
    let head = read_head(s, pending).await;
    let length: usize = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while pending.len() < length {
        let mut more = [0u8; 4096];
        let n = s.read(&mut more).await.unwrap();
        assert!(n > 0, "closed mid-body");
        pending.extend_from_slice(&more[..n]);
    }
    let body = pending.drain(..length).collect();
    (head, body)
}

/// An answer's head, taken out of what `s` sent (`pending` keeps what follows it).
async fn read_head(s: &mut TcpStream, pending: &mut Vec<u8>) -> String {
    let end = loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut more = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut more))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before an answer");
        pending.extend_from_slice(&more[..n]);
    };
    let head = String::from_utf8_lossy(&pending[..end]).into_owned();
    pending.drain(..end);
    head
}

#[tokio::test]
async fn a_head_trickled_in_after_a_first_request_is_cut_off_at_header_read() {
    let app = application().await;
    let mut config = support::config(&format!("http://{app}"));
    config.timeouts.header_read = 0.5;
    let proxy = Proxy::start(config).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_answer(&mut s, &mut Vec::new()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The next head trickles in a byte every 100 ms, never complete: the limit is on the
    // whole head, not on each read.
    let started = tokio::time::Instant::now();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut buf = [0u8; 512];
            tokio::select! {
                n = s.read(&mut buf) => if matches!(n, Ok(0) | Err(_)) { break },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if s.write_all(b"X").await.is_err() { break; }
                }
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still connected after 5 s");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cut off after {:?}",
        started.elapsed()
    );
}

/// An answer slower than `timeouts.header_read` does not make its connection idle:
/// requests pipelined behind it are answered, and the connection stays open for more.
/// Before, the connection was taken for idle while the application worked, and closed
/// after the slow answer with the next request unanswered.
#[tokio::test]
async fn requests_pipelined_behind_an_answer_slower_than_header_read_are_answered() {
    let app = application().await;
    let mut config = support::config(&format!("http://{app}"));
    config.timeouts.header_read = 0.3;
    let proxy = Proxy::start(config).await;
    // Served by the proxy's own HTTP/1.1, and by hyper (a request with a body).
    for first in [
        &b"GET /slower HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        b"POST /slower HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi",
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(first).await.unwrap();
        s.write_all(b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut pending = Vec::new();
        for expected in ["/slower", "/second"] {
            let (head, body) = read_answer(&mut s, &mut pending).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{expected}: {head}");
            assert!(
                !head.to_ascii_lowercase().contains("connection: close"),
                "{expected}: {head}"
            );
            assert_eq!(String::from_utf8_lossy(&body), expected);
        }
        s.write_all(b"GET /third HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_answer(&mut s, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(String::from_utf8_lossy(&body), "/third");
    }
}

/// A response body that streams for longer than `timeouts.header_read` does not make
/// its connection idle either: the connection takes the next request.
#[tokio::test]
async fn a_connection_whose_answer_streamed_past_header_read_takes_the_next_request() {
    let app = application().await;
    let mut config = support::config(&format!("http://{app}"));
    config.timeouts.header_read = 0.3;
    let proxy = Proxy::start(config).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /trickle HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let head = read_head(&mut s, &mut pending).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    while !pending.ends_with(b"0\r\n\r\n") {
        let mut more = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut more))
            .await
            .expect("the body")
            .unwrap();
        assert!(n > 0, "closed mid-body");
        pending.extend_from_slice(&more[..n]);
    }
    pending.clear();
    s.write_all(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut s, &mut pending).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(String::from_utf8_lossy(&body), "/next");
}

/// Whether the requests behind the first are served here or (one with a body, one
/// with `TE`) by hyper, which takes the connection over.
#[tokio::test]
async fn pipelined_requests_before_a_half_close_are_all_answered() {
    let proxy = proxy().await;
    for second in [
        "GET /second HTTP/1.1\r\nhost: x\r\n\r\n",
        "POST /second HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nZ",
        "GET /second HTTP/1.1\r\nhost: x\r\nte: trailers\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(format!("GET /slow HTTP/1.1\r\nhost: x\r\n\r\n{second}").as_bytes())
            .await
            .unwrap();
        // The client is done sending, not gone: it still reads.
        s.shutdown().await.unwrap();
        let out = read_until_closed(&mut s, "the proxy closes once both are answered").await;
        assert_eq!(
            out.matches("HTTP/1.1 200 OK").count(),
            2,
            "{second:?}: {out}"
        );
        assert!(out.ends_with("/second"), "{second:?}: {out}");
    }
}

#[tokio::test]
async fn a_client_that_leaves_while_the_body_streams_frees_the_application_connection() {
    // The application sends a head and one chunk, then nothing more until the proxy
    // closes its connection.
    let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
    let (app, mut release) = one_answer_app(answer, false).await;
    let proxy = Proxy::start(support::config(&format!("http://{app}"))).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("hello") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the first chunk")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    tokio::time::timeout(Duration::from_secs(3), release.recv())
        .await
        .expect("the application's connection is closed once the client has left");
}

#[tokio::test]
async fn the_applications_reason_phrase_reaches_the_client() {
    let proxy = proxy().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /reason HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut s, &mut Vec::new()).await;
    assert_eq!(head.lines().next(), Some("HTTP/1.1 599 Upstream Said So"));
    assert_eq!(body, b"ok");
}

/// Everything the proxy sends on `s` until it closes the connection; `closes` says when
/// it should have.
async fn read_until_closed(s: &mut TcpStream, closes: &str) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect(closes)
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw connection to the proxy, and one hyper serves: its first request has a body.
async fn both_paths(proxy: &Proxy) -> [(TcpStream, Vec<u8>, &'static str); 2] {
    let own = TcpStream::connect(proxy.addr).await.unwrap();
    let mut handed = TcpStream::connect(proxy.addr).await.unwrap();
    handed
        .write_all(b"POST /post HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nZ")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let (head, _) = read_answer(&mut handed, &mut pending).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    [(own, Vec::new(), "own"), (handed, pending, "hyper")]
}

#[tokio::test]
async fn a_length_the_application_repeats_reaches_the_client_once() {
    let proxy = proxy().await;
    for (mut s, mut pending, path) in both_paths(&proxy).await {
        for (method, target) in [
            ("GET", "/length-list"),
            ("HEAD", "/length-list"),
            ("GET", "/length-twice"),
            ("HEAD", "/length-twice"),
        ] {
            let request = format!("{method} {target} HTTP/1.1\r\nhost: x\r\n\r\n");
            s.write_all(request.as_bytes()).await.unwrap();
            let (head, body) = if method == "HEAD" {
                // No body follows, whatever the length says.
                (read_head(&mut s, &mut pending).await, Vec::new())
            } else {
                read_answer(&mut s, &mut pending).await
            };
            let lengths: Vec<&str> = head
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
                .collect();
            assert_eq!(lengths.len(), 1, "{path} {method} {target}: {head}");
            assert_eq!(lengths[0].to_ascii_lowercase(), "content-length: 3");
            if method == "GET" {
                assert_eq!(body, b"abc", "{path} {method} {target}");
            }
        }
        s.write_all(b"GET /none-lengths HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 204"), "{path}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "{path}: {head}"
        );
    }
}

#[tokio::test]
async fn a_repeated_zero_length_reaches_the_application_once() {
    let proxy = proxy().await;
    for (mut s, mut pending, path) in both_paths(&proxy).await {
        s.write_all(
            b"GET /head HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n",
        )
        .await
        .unwrap();
        let (head, body) = read_answer(&mut s, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        let seen = String::from_utf8_lossy(&body);
        let lengths = seen.lines().filter(|l| l.starts_with("content-length:"));
        assert!(lengths.count() <= 1, "{path}: {seen}");
    }
}

#[tokio::test]
async fn chunk_sizes_with_leading_zeros_and_long_extensions_are_read_whole() {
    let proxy = proxy().await;
    let mut c = connection(&proxy).await;
    let (_, body, _) = send(&mut c, "GET", "/zeros", b"").await;
    assert_eq!(&body[..], b"abc");
    // Extensions adding up to less than 16 KiB in a body, as hyper reads them.
    let (_, body, _) = send(&mut c, "GET", "/extensions", b"").await;
    assert_eq!(&body[..], b"aaa");
    // More: the body ends broken off, as it would through hyper.
    c.ready().await.unwrap();
    let request = Request::get("/too-many-extensions")
        .header("host", "app.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = c.send_request(request).await.unwrap();
    assert!(response.into_body().collect().await.is_err());
}

#[tokio::test]
async fn a_204_reaches_an_http2_client_without_lengths() {
    let proxy = proxy().await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let executor = hyper_util::rt::TokioExecutor::new();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(executor, TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get(format!("http://{}/none-lengths", proxy.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.expect("a clean answer");
    assert_eq!(response.status(), 204);
    assert!(!response.headers().contains_key("content-length"));
}

/// An HTTP/2 preface must be the first bytes of a connection (RFC 9113 §3.4): after
/// HTTP/1.1 requests it is not taken for one, and no HTTP/2 frame answers it.
#[tokio::test]
async fn an_http2_preface_after_http1_requests_is_not_one() {
    let proxy = proxy().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let (head, _) = read_answer(&mut s, &mut pending).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The preface, then an empty SETTINGS frame.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let rest = read_until_closed(&mut s, "the connection closes").await;
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 4") || rest.starts_with("HTTP/1.1 5"),
        "{rest:?}"
    );
}
