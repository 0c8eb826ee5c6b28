//! The proxy's own HTTP/1.1: request heads from clients (`http1::server::parse`), answer
//! heads from the application (`http1::client::parse_answer`) and chunked bodies
//! (`http1::chunked::Decoder`), on arbitrary bytes.
//!
//! Input: the first byte picks the size of the pieces the rest arrives in (1–64 bytes);
//! the rest is read as a client's byte stream, as an application's answer, and as a
//! chunked body.
//!
//! Invariants:
//! - a request the proxy serves itself has a path target, no body (no
//!   `Transfer-Encoding`, a `Content-Length` of 0 at most), asks for no upgrade,
//!   interim answer or trailers; what it took out of the buffer is exactly the head,
//!   and a request left to hyper leaves the buffer exactly as it was;
//! - an answer head and a chunked body decode the same whole or in pieces, and a body
//!   never decodes to more bytes than arrived.

#![no_main]

use bytes::BytesMut;
use http::header;
use libfuzzer_sys::fuzz_target;
use session_proxy::http1::chunked::Decoder;
use session_proxy::http1::client::{MAX_HEAD, parse_answer};
use session_proxy::http1::server::{Parsed, parse};

fn requests(input: &[u8]) {
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.clone();
        match parse(&mut buf) {
            Parsed::Request(request, _) => {
                let taken = before.len() - buf.len();
                assert!(taken > 0 && before[..taken].ends_with(b"\n"));
                assert_eq!(&before[taken..], &buf[..], "only the head is taken");
                assert!(request.uri().path().starts_with('/'));
                let h = request.headers();
                for name in [header::TRANSFER_ENCODING, header::UPGRADE, header::EXPECT, header::TE] {
                    assert!(!h.contains_key(&name), "{name} stays with hyper");
                }
                for value in h.get_all(header::CONTENT_LENGTH) {
                    assert_eq!(value.as_bytes().trim_ascii(), b"0");
                }
            }
            Parsed::Partial | Parsed::Other => {
                assert_eq!(before, buf, "what is left to hyper is left whole");
                return;
            }
        }
    }
}

/// The answer's status and headers, or the error, once fed in pieces of `step` bytes.
fn answer(input: &[u8], step: usize) -> Option<Result<String, String>> {
    let mut buf = BytesMut::new();
    let mut interim = false;
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        match parse_answer(&mut buf, false, MAX_HEAD, &mut interim) {
            Ok(Some(answer)) => {
                return Some(Ok(format!(
                    "{} {:?} {:?} {}",
                    answer.head.status,
                    answer.head.headers,
                    answer.length(),
                    answer.keep_alive
                )));
            }
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
    }
    None
}

/// The data a chunked body decodes to, and whether it ended or failed, in pieces.
fn chunked(input: &[u8], step: usize) -> (Vec<u8>, Result<bool, &'static str>) {
    let mut decoder = Decoder::default();
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if let Ok(d) = frame.into_data() {
                        data.extend_from_slice(&d);
                    }
                }
                Ok(None) => break,
                Err(e) => return (data, Err(e)),
            }
        }
        if decoder.is_done() {
            break;
        }
    }
    (data, Ok(decoder.is_done()))
}

fuzz_target!(|input: &[u8]| {
    let Some((first, rest)) = input.split_first() else {
        return;
    };
    let step = usize::from(first % 64) + 1;
    requests(rest);
    let whole = answer(rest, rest.len().max(1));
    let pieces = answer(rest, step);
    match (&whole, &pieces) {
        (Some(Ok(a)), Some(Ok(b))) => assert_eq!(a, b),
        (Some(Err(_)), Some(Err(_))) | (None, None) => {}
        (a, b) => panic!("whole: {a:?}, in pieces: {b:?}"),
    }
    let (whole_data, whole_end) = chunked(rest, rest.len().max(1));
    let (piece_data, piece_end) = chunked(rest, step);
    assert!(whole_data.len() <= rest.len());
    if whole_end.is_ok() && piece_end.is_ok() {
        assert_eq!(whole_data, piece_data);
        assert_eq!(whole_end, piece_end);
    }
    assert_eq!(whole_end.is_err(), piece_end.is_err(), "{whole_end:?} / {piece_end:?}");
});
