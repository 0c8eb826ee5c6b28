//! The chunked transfer coding (RFC 9112 §7.1): decoding the application's bodies and
//! encoding the proxy's.

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use hyper::body::Frame;

use super::{FieldAt, MAX_HEADERS, header_map, locate};

/// A body's chunk extensions (the bytes after each `;`) must add up to less than this,
/// as hyper counts them; they are read and dropped.
const MAX_EXTENSIONS: usize = 16 * 1024;
/// A chunk-size line (size and extensions) may be at most this long.
const MAX_LINE: usize = MAX_EXTENSIONS + 1024;
/// The trailer section may be at most this long.
const MAX_TRAILERS: usize = 16 * 1024;

/// Decodes a chunked body as its bytes arrive.
#[derive(Debug, Default)]
pub struct Decoder {
    state: State,
    /// The bytes of chunk extensions so far.
    extensions: usize,
}

#[derive(Debug, Default, PartialEq)]
enum State {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// This many bytes of chunk data to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
    Done,
}

impl Decoder {
    /// Whether the whole body, trailers included, has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The next frame the bytes in `buf` complete, taken out of `buf`; `Ok(None)` when
    /// more bytes are needed, or the body is done.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Bytes>>, &'static str> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Size => {
                    let end = buf.iter().position(|b| *b == b'\n');
                    // The same limit however the bytes arrive: found or not yet.
                    if end.map_or(buf.len(), |end| end + 1) > MAX_LINE {
                        return Err("a chunk-size line that is too long");
                    }
                    let Some(end) = end else { return Ok(None) };
                    let (size, extensions) = chunk_size(&buf[..=end])?;
                    self.extensions += extensions;
                    if self.extensions >= MAX_EXTENSIONS {
                        return Err("chunk extensions that are too long");
                    }
                    buf.advance(end + 1);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(Some(Frame::data(data)));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data longer than its size");
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    const BAD: &str = "a malformed or too long trailer section";
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let mut at = [FieldAt::default(); MAX_HEADERS];
                    let (len, count) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, parsed))) if len <= MAX_TRAILERS => {
                            locate(buf, parsed, &mut at);
                            (len, parsed.len())
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= MAX_TRAILERS => {
                            return Ok(None);
                        }
                        _ => return Err(BAD),
                    };
                    let section = buf.split_to(len).freeze();
                    self.state = State::Done;
                    let trailers = header_map(&section, &at[..count], 0).ok_or(BAD)?;
                    return Ok((!trailers.is_empty()).then(|| Frame::trailers(trailers)));
                }
            }
        }
    }
}

/// The size a chunk-size line (`1a;ext=v\r\n`) gives, and how long its extensions are.
fn chunk_size(line: &[u8]) -> Result<(u64, usize), &'static str> {
    const BAD: &str = "a malformed chunk-size line";
    let line = line.strip_suffix(b"\r\n").ok_or(BAD)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // Leading zeros add nothing: only the digits after them must fit 64 bits.
    let zeros = line.iter().take_while(|b| **b == b'0').count().min(digits);
    if digits == 0 || digits - zeros > 16 {
        return Err(BAD);
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';')
        || rest.iter().any(|b| b.is_ascii_control() && *b != b'\t')
    {
        return Err(BAD);
    }
    let hex = std::str::from_utf8(&line[zeros..digits]).map_err(|_| BAD)?;
    let size = if hex.is_empty() {
        0
    } else {
        u64::from_str_radix(hex, 16).map_err(|_| BAD)?
    };
    // The extensions: what follows the `;`.
    Ok((size, rest.len().saturating_sub(1)))
}

/// Appends the head of a chunk of `len` bytes.
pub fn chunk_head(out: &mut Vec<u8>, len: usize) {
    use std::io::Write;
    let _ = write!(out, "{len:X}\r\n");
}

/// The last chunk and the trailer section, `trailers` included when given.
pub fn last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    if let Some(trailers) = trailers {
        super::write_headers(out, trailers);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes: the data and the trailers.
    fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), &'static str> {
        let mut decoder = Decoder::default();
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(frame) = decoder.decode(&mut buf)? {
                match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                }
            }
        }
        if !decoder.is_done() || !buf.is_empty() {
            return Err("incomplete");
        }
        Ok((data, trailers))
    }

    #[test]
    fn bodies_decode_whatever_the_pieces_they_arrive_in() {
        let body = b"5\r\nhello\r\n7;ext=\"x\"\r\n, world\r\n0\r\nX-Sum: 1\r\n\r\n";
        for step in 1..body.len() {
            let (data, trailers) = decode(body, step).unwrap();
            assert_eq!(data, b"hello, world");
            assert_eq!(trailers.unwrap()["x-sum"], "1");
        }
        assert_eq!(decode(b"0\r\n\r\n", 1).unwrap(), (vec![], None));
        assert_eq!(
            decode(b"A \r\n0123456789\r\n0\r\n\r\n", 3).unwrap().0,
            b"0123456789"
        );
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for bad in [
            &b"5\r\nhello!\r\n0\r\n\r\n"[..],
            b"x\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"0\r\nbad header\r\n\r\n",
        ] {
            assert!(
                decode(bad, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let endless = [b'1'; MAX_LINE + 2];
        assert!(decode(&endless, MAX_LINE + 2).is_err());
        // The limits hold however the bytes arrive: whole, or in pieces.
        let long_extension = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(MAX_LINE));
        let long_trailer = format!("0\r\nx-big: {}\r\n\r\n", "x".repeat(MAX_TRAILERS));
        for body in [long_extension, long_trailer] {
            assert!(decode(body.as_bytes(), body.len()).is_err());
            assert!(decode(body.as_bytes(), 7).is_err());
        }
        // Incomplete: more bytes would be needed.
        assert_eq!(decode(b"5\r\nhel", 2), Err("incomplete"));
    }

    #[test]
    fn leading_zeros_and_extensions_up_to_the_limit_are_read() {
        let zeros = b"000000000000000000000005\r\nhello\r\n000000000000000000\r\n\r\n";
        for step in [1, 5, zeros.len()] {
            assert_eq!(decode(zeros, step).unwrap().0, b"hello");
        }
        // Extensions (what follows each `;`) must add up to less than MAX_EXTENSIONS, over
        // any number of chunks, as hyper counts them.
        let chunk = |ext: usize| format!("1;{}\r\na\r\n", "x".repeat(ext));
        let half = MAX_EXTENSIONS / 2;
        let fits = chunk(half) + &chunk(half - 1) + "0\r\n\r\n";
        let over = chunk(half).repeat(2) + "0\r\n\r\n";
        for step in [1, 7, 4096, over.len()] {
            assert_eq!(decode(fits.as_bytes(), step).unwrap().0, b"aa");
            assert!(decode(over.as_bytes(), step).is_err(), "{step}");
        }
        // Empty extensions, and spaces after the size, count for nothing.
        let many = "1;\r\na\r\n1 \r\na\r\n".repeat(MAX_EXTENSIONS) + "0\r\n\r\n";
        assert_eq!(
            decode(many.as_bytes(), 4096).unwrap().0.len(),
            2 * MAX_EXTENSIONS
        );
    }

    #[test]
    fn chunks_encode_as_they_decode() {
        let mut out = Vec::new();
        chunk_head(&mut out, 300);
        out.extend_from_slice(&[b'a'; 300]);
        out.extend_from_slice(b"\r\n");
        let mut t = HeaderMap::new();
        t.insert("x-sum", http::HeaderValue::from_static("9"));
        last_chunk(&mut out, Some(&t));
        let (data, trailers) = decode(&out, 7).unwrap();
        assert_eq!(data.len(), 300);
        assert_eq!(trailers.unwrap()["x-sum"], "9");
    }
}
