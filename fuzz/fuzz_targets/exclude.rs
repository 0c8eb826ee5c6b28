//! `session.exclude`: `Exclusions::new`, `Exclusions::matches`, `exclude::normalize` and
//! `exclude::leaves_root` on arbitrary globs and request paths.
//!
//! Input: lines; the last is the request path, the ones before it (at most 8, each at
//! most 128 bytes) the exclusion globs.
//!
//! Invariants for `normalize(path)`:
//! - a path that starts with `/` (every origin-form request path) stays so;
//! - the result holds no `.` or `..` segment (so no `/./` or `/../`);
//! - normalising the result again changes nothing, as long as the result holds no `%`:
//!   `normalize` percent-decodes once, so `%252e` becomes `%2e` and a second pass would
//!   decode that again. The proxy normalises each request path exactly once, like an
//!   application that decodes its path once (see SECURITY.md).
//! - `matches(path)` equals `matches(normalize(path))` whenever normalising is idempotent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use session_proxy::session::exclude::{self, Exclusions};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines: Vec<&str> = text.split('\n').collect();
    let path = lines.pop().unwrap_or_default();
    if lines.len() > 8 || lines.iter().any(|l| l.len() > 128) {
        return;
    }

    // `leaves_root` never panics, and needs a dot, plain or percent-encoded, to say yes.
    if exclude::leaves_root(path) {
        assert!(path.contains('.') || path.contains('%'), "{path:?}");
    }

    let once = exclude::normalize(path);
    if path.starts_with('/') {
        assert!(
            once.starts_with('/'),
            "{path:?} -> {once:?} lost its leading /"
        );
    }
    assert!(
        once.split('/').all(|s| s != "." && s != ".."),
        "{path:?} -> {once:?} keeps a dot segment"
    );
    let idempotent = if once.contains('%') {
        false
    } else {
        let twice = exclude::normalize(&once);
        assert_eq!(once, twice, "normalize is not idempotent on {path:?}");
        true
    };

    let patterns: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    if let Ok(exclusions) = Exclusions::new(&patterns) {
        let direct = exclusions.matches(path);
        if idempotent {
            assert_eq!(
                direct,
                exclusions.matches(&once),
                "{path:?} and its normal form {once:?} match differently"
            );
        }
    }
});
