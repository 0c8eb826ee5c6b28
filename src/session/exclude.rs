//! `session.exclude`: request paths that get no session.

use std::borrow::Cow;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use percent_encoding::percent_decode_str;

/// Compiled exclusion globs. `*` never crosses `/`, `**` does. Paths are matched after
/// percent-decoding and dot-segment removal, so `/static/../account` is `/account`.
#[derive(Clone, Debug)]
pub struct Exclusions {
    set: GlobSet,
}

impl Exclusions {
    pub fn new(patterns: &[String]) -> Result<Exclusions, String> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("pattern `{pattern}`: {e}"))?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|e| e.to_string())?;
        Ok(Exclusions { set })
    }

    /// Whether a request for `path` (without the query) gets no session.
    pub fn matches(&self, path: &str) -> bool {
        !self.set.is_empty() && self.set.is_match(normalize(path).as_ref())
    }
}

/// Percent-decodes `path`, reads `\` as `/` (as IIS and WHATWG URL parsers do), merges
/// repeated slashes (many servers read `//static/x` as `/static/x`), and removes its dot
/// segments (RFC 3986 §5.2.4), a segment's `;parameters` left out (`..;` is `..` to
/// Tomcat and Spring): the path as the application may read it, as `leaves_root` does.
pub fn normalize(path: &str) -> Cow<'_, str> {
    let mut decoded = percent_decode_str(path).decode_utf8_lossy();
    if decoded.contains('\\') {
        decoded = Cow::Owned(decoded.replace('\\', "/"));
    }
    if decoded.contains("//") {
        let mut merged = String::with_capacity(decoded.len());
        for c in decoded.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        decoded = Cow::Owned(merged);
    }
    if !decoded.contains("/.") && !decoded.starts_with('.') {
        return decoded;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        let bare = segment.split(';').next().unwrap_or_default();
        match bare {
            "." | ".." => {
                if bare == ".." && out.len() > 1 {
                    out.pop();
                }
                // A trailing dot segment leaves a directory: `/a/b/..` is `/a/`.
                if i == last {
                    out.push("");
                }
            }
            _ => out.push(segment),
        }
    }
    let mut joined = out.join("/");
    if !joined.starts_with('/') {
        joined.insert(0, '/');
    }
    Cow::Owned(joined)
}

/// Whether `path`'s dot segments climb above its root (`/../x`, `/a/../../x`), read the
/// way servers read it: percent-decoded, repeated slashes as one, `\` as a slash too
/// (IIS, and WHATWG URL parsers such as Node's), and a segment's `;parameters` left out
/// (`..;` is `..` to Tomcat and Spring). No server can mean such a path, and one behind
/// an upstream path prefix could be read as a path outside that prefix.
pub fn leaves_root(path: &str) -> bool {
    if !path.contains('.') && !path.contains('%') {
        return false;
    }
    let decoded = percent_decode_str(path).decode_utf8_lossy();
    let mut depth = 0_usize;
    let segments = decoded
        .split(['/', '\\'])
        .map(|s| s.split(';').next().unwrap_or_default())
        .filter(|s| !s.is_empty());
    for segment in segments {
        match segment {
            "." => {}
            ".." if depth == 0 => return true,
            ".." => depth -= 1,
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(patterns: &[&str]) -> Exclusions {
        Exclusions::new(&patterns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn single_star_stays_in_a_segment_double_star_crosses() {
        let e = ex(&["/static/**", "/img/*.png"]);
        assert!(e.matches("/static/a/b.css"));
        assert!(e.matches("/img/a.png"));
        assert!(!e.matches("/img/a/b.png"));
        assert!(!e.matches("/account"));
    }

    #[test]
    fn paths_are_decoded_and_dot_segments_removed() {
        assert_eq!(normalize("/static/../account"), "/account");
        assert_eq!(normalize("/a/./b/../c"), "/a/c");
        assert_eq!(normalize("/../../x"), "/x");
        assert_eq!(normalize("/a/b/.."), "/a/");
        assert_eq!(normalize("/st%61tic/x"), "/static/x");
        assert_eq!(normalize("/static/%2e%2e/account"), "/account");
        let e = ex(&["/static/**"]);
        assert!(!e.matches("/static/../account"));
        assert!(!e.matches("/static/%2E%2E/account"));
        assert!(e.matches("/%73tatic/app.js"));
        assert!(e.matches("/account/../static/app.js"));
        // As servers that read `\` as `/`, or `..;` as `..`, read them.
        assert_eq!(normalize("/static/..;/account"), "/account");
        assert_eq!(normalize("/static/..%5caccount"), "/account");
        assert_eq!(normalize("/static\\app.js"), "/static/app.js");
        assert_eq!(normalize("/a;x/b"), "/a;x/b");
        assert_eq!(normalize("/a;x/./b;y/../c"), "/a;x/c");
        assert!(!e.matches("/static/..;/account"));
        assert!(!e.matches("/static/..\\account"));
        assert!(e.matches("/static\\app.js"));
    }

    #[test]
    fn paths_that_climb_above_the_root_are_told() {
        for path in [
            "/..",
            "/../x",
            "/a/../../x",
            "/%2e%2e/x",
            "/%2E%2e",
            "//..//x",
            "/a/%2F../../x",
            "/..\\x",
            "/x/..\\..\\x",
            "/..%5c..%5cx",
            "/%2e%2e%5Cx",
            "/..;/x",
            "/a/..;/..;/x",
            "/..;jsessionid=1/x",
        ] {
            assert!(leaves_root(path), "{path}");
        }
        for path in [
            "/",
            "/a/../b",
            "/a/b/../..",
            "/..a/x",
            "/a..",
            "/.well-known/x",
            "/%41",
            "/a..b",
            "/a\\..\\b",
            "/a;x/..;y/b",
        ] {
            assert!(!leaves_root(path), "{path}");
        }
    }

    #[test]
    fn repeated_slashes_are_one() {
        assert_eq!(normalize("//static//a.css"), "/static/a.css");
        assert_eq!(normalize("/%2F/static/x"), "/static/x");
        assert_eq!(normalize("/a//..//b"), "/b");
        let e = ex(&["/static/**", "/img/*.png"]);
        assert!(e.matches("//static/app.css"));
        assert!(e.matches("/img//a.png"));
        assert!(!e.matches("//account"));
    }

    #[test]
    fn bad_patterns_are_reported() {
        assert!(Exclusions::new(&["/a/[".to_string()]).is_err());
    }
}
