//! The session cookie as a client presents it: `SessionCookie::find`,
//! `SessionCookie::strip` and `SessionCookie::take` on arbitrary `Cookie` headers, and
//! `IdShape::parse` on arbitrary text.
//!
//! Input: the `Cookie` header values, one per line (`\n` separates them; values
//! `HeaderValue::from_bytes` refuses are skipped, as hyper would never hand them over).
//!
//! Invariants:
//! - a found ID re-parses with the cookie's shape to the same ID;
//! - after `strip`, no cookie pair named like the session cookie is left, and every
//!   other pair is still there, byte for byte and in order;
//! - `IdShape::parse` accepts only text of exactly the encoded length, and what it
//!   accepts parses back to itself.

#![no_main]

use std::sync::LazyLock;

use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use session_proxy::config::SessionConfig;
use session_proxy::session::cookie::SessionCookie;
use session_proxy::session::id::IdShape;

/// The cookie configurations every input runs against: with and without a secret,
/// with a fallback secret, another name and other ID sizes.
static COOKIES: LazyLock<Vec<(String, SessionCookie)>> = LazyLock::new(|| {
    let configs = [
        SessionConfig::default(),
        SessionConfig {
            secret: Some("fuzz-secret-0123456789abcdef".into()),
            ..SessionConfig::default()
        },
        SessionConfig {
            cookie_name: "sid".into(),
            id_bytes: 16,
            secret: Some("fuzz-secret-0123456789abcdef".into()),
            secret_fallbacks: vec!["old-fuzz-secret-0123456789".into()],
            ..SessionConfig::default()
        },
        SessionConfig {
            cookie_name: "s".into(),
            id_bytes: 64,
            ..SessionConfig::default()
        },
    ];
    configs
        .into_iter()
        .map(|c| (c.cookie_name.clone(), SessionCookie::new(&c)))
        .collect()
});

const SHAPES: [usize; 4] = [16, 17, 32, 64];

/// The cookie pairs of the `Cookie` header(s), split as the proxy splits them:
/// `(name, whole pair)`, both trimmed.
fn pairs(headers: &HeaderMap) -> Vec<(Vec<u8>, Vec<u8>)> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let name = pair.split(|b| *b == b'=').next().unwrap_or(pair);
            (name.trim_ascii().to_vec(), pair.to_vec())
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for bytes in SHAPES {
            let shape = IdShape::new(bytes).expect("shape in range");
            if let Some(id) = shape.parse(text) {
                assert_eq!(id.as_str(), text);
                assert_eq!(text.len(), shape.encoded_len());
                assert_eq!(shape.parse(id.as_str()).as_ref(), Some(&id));
            }
        }
    }

    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(COOKIE, value);
        }
    }
    let before = pairs(&headers);

    for (name, cookie) in COOKIES.iter() {
        if let Some(found) = cookie.find(&headers) {
            let again = cookie.shape().parse(found.id.as_str());
            assert_eq!(
                again.as_ref(),
                Some(&found.id),
                "found ID does not re-parse"
            );
        }

        let mut stripped = headers.clone();
        cookie.strip(&mut stripped);
        let after = pairs(&stripped);
        assert!(
            after.iter().all(|(n, _)| n != name.as_bytes()),
            "cookie `{name}` still sent upstream after strip: {after:?}"
        );
        let others: Vec<_> = before
            .iter()
            .filter(|(n, _)| n != name.as_bytes())
            .cloned()
            .collect();
        assert_eq!(after, others, "strip changed other cookies");
        // The application never sees the session ID, so nothing can be found any more.
        assert_eq!(cookie.find(&stripped), None);

        // The request path finds and strips in one pass: the same result as both.
        let mut taken = headers.clone();
        assert_eq!(cookie.take(&mut taken), cookie.find(&headers), "take found otherwise");
        assert_eq!(pairs(&taken), after, "take stripped otherwise");
    }
});
