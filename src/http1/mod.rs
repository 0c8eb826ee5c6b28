//! The proxy's own HTTP/1.1 for the common case: a request without a body, answered with
//! a body of known length or chunked. [`server`] reads such requests from clients and
//! writes their responses; [`client`] sends them to the application and reads its
//! answers. Anything else (a request body, an upgrade, HTTP/2, a request this parser
//! does not take) is left to hyper, which serves the rest of that connection.
//!
//! Both sides build the same `http` types hyper does, so the request path in
//! [`crate::proxy`] is one, whichever reads the request or sends it on.

pub mod chunked;
pub mod client;
pub mod server;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// At most this many header fields in a head, as hyper allows: more is refused.
pub const MAX_HEADERS: usize = 100;

/// Where one header field lies in a parsed head, so that the head can be frozen into
/// [`Bytes`] and the values shared with it instead of copied.
#[derive(Clone, Copy, Default)]
pub struct FieldAt {
    // 32-bit offsets: a head is far shorter (its limits are a few hundred KiB), and the
    // array of 100 of them is cleared for every head parsed.
    name: (u32, u32),
    value: (u32, u32),
}

/// Records where `headers` lie within `head`, which they were parsed from.
pub fn locate(head: &[u8], headers: &[httparse::Header<'_>], into: &mut [FieldAt]) {
    let base = head.as_ptr() as usize;
    let offset = |at: usize| u32::try_from(at).unwrap_or(u32::MAX);
    for (field, at) in headers.iter().zip(into.iter_mut()) {
        let name = field.name.as_ptr() as usize - base;
        let value = field.value.as_ptr() as usize - base;
        *at = FieldAt {
            name: (offset(name), offset(name + field.name.len())),
            value: (offset(value), offset(value + field.value.len())),
        };
    }
}

/// The header map of a head frozen into `head`, from the places [`locate`] recorded, with
/// room for `spare` more fields. `None` if a name or value is not valid (httparse is a
/// little more lenient than `http`'s types).
pub fn header_map(head: &Bytes, fields: &[FieldAt], spare: usize) -> Option<HeaderMap> {
    let range = |(start, end): (u32, u32)| {
        let (start, end) = (start as usize, end as usize);
        (start <= end && end <= head.len()).then_some(start..end)
    };
    let mut map = HeaderMap::with_capacity(fields.len() + spare);
    for at in fields {
        let name = HeaderName::from_bytes(&head[range(at.name)?]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(range(at.value)?)).ok()?;
        map.append(name, value);
    }
    Some(map)
}

/// Appends `headers` as HTTP/1.1 header lines.
pub fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Whether a `Connection` header names `token`.
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a head announces a body (`Transfer-Encoding`, or a `Content-Length` other than
/// 0, or one that cannot be read). An answer that has no body by rule (to `HEAD`, a 204 or
/// a 304) but announces one may come from an application that sends a body anyway: its
/// connection is not reused, or those late bytes would be read as the next request's
/// answer.
pub fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || !matches!(content_length(headers), Ok(None | Some(0)))
}

/// The body length the `Content-Length` fields give: `Ok(None)` without one, an error
/// when they do not agree or do not parse (RFC 9112 §6.3: unrecoverable).
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err("a Content-Length that is not a number");
            }
            let n = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("a Content-Length that is not a number")?;
            if length.is_some_and(|l| l != n) {
                return Err("Content-Length fields that disagree");
            }
            length = Some(n);
        }
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_lengths_must_agree_and_be_numbers() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), Ok(None));
        h.append("content-length", HeaderValue::from_static("12"));
        assert_eq!(content_length(&h), Ok(Some(12)));
        h.append("content-length", HeaderValue::from_static("12, 12"));
        assert_eq!(content_length(&h), Ok(Some(12)));
        h.append("content-length", HeaderValue::from_static("13"));
        assert!(content_length(&h).is_err());
        for bad in ["", "-1", "+1", "1 2", "0x10", "99999999999999999999", "1,"] {
            let mut h = HeaderMap::new();
            h.append("content-length", HeaderValue::from_str(bad).unwrap());
            assert!(content_length(&h).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fields_are_shared_with_the_head() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: v a l\r\n\r\n";
        let mut fields = [httparse::EMPTY_HEADER; 4];
        let mut req = httparse::Request::new(&mut fields);
        req.parse(raw).unwrap();
        let mut at = [FieldAt::default(); 4];
        locate(raw, req.headers, &mut at);
        let n = req.headers.len();
        let head = Bytes::from_static(raw);
        let map = header_map(&head, &at[..n], 0).unwrap();
        assert_eq!(map["host"], "a");
        assert_eq!(map["x-long"], "v a l");
        assert!(!connection_has(&map, "close"));
    }
}
