//! The session cookie: finding it in a request, hiding it from the application, and
//! the `Set-Cookie` values that set and clear it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::header::{CACHE_CONTROL, COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

use super::id::{IdShape, SessionId};
use crate::config::{SameSite, SessionConfig};

/// The session cookie's name, attributes and (optional) signing keys.
#[derive(Clone, Debug)]
pub struct SessionCookie {
    name: String,
    shape: IdShape,
    signer: Option<Signer>,
    /// `; Max-Age=…; Path=…` and the rest, rendered once.
    set_attributes: String,
    clear_attributes: String,
}

/// A session cookie found in a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presented {
    pub id: SessionId,
    /// Signed with a fallback secret: the response re-signs it with the current one.
    pub needs_resign: bool,
}

impl SessionCookie {
    pub fn new(config: &SessionConfig) -> SessionCookie {
        let secure = config.secure || config.same_site == SameSite::None;
        let mut attrs = format!("; Path={}", config.path);
        if let Some(domain) = &config.domain {
            attrs.push_str("; Domain=");
            attrs.push_str(domain);
        }
        if secure {
            attrs.push_str("; Secure");
        }
        if config.http_only {
            attrs.push_str("; HttpOnly");
        }
        attrs.push_str(match config.same_site {
            SameSite::Lax => "; SameSite=Lax",
            SameSite::Strict => "; SameSite=Strict",
            SameSite::None => "; SameSite=None",
        });
        SessionCookie {
            name: config.cookie_name.clone(),
            shape: IdShape::new(config.id_bytes).unwrap_or_default(),
            signer: config
                .secret
                .as_ref()
                .map(|current| Signer::new(current, &config.secret_fallbacks)),
            set_attributes: format!("; Max-Age={}{attrs}", config.max_age),
            clear_attributes: format!("; Max-Age=0{attrs}"),
        }
    }

    pub fn shape(&self) -> IdShape {
        self.shape
    }

    /// The first well-formed (and, with a secret, correctly signed) session cookie in
    /// the request. Anything else is treated as no cookie, without touching the store.
    pub fn find(&self, headers: &HeaderMap) -> Option<Presented> {
        self.pairs(headers)
            .find_map(|value| value.and_then(|v| self.check_bytes(v)))
    }

    /// [`SessionCookie::find`] and [`SessionCookie::strip`] in one pass over the
    /// `Cookie` header: the application never sees the session cookie.
    pub fn take(&self, headers: &mut HeaderMap) -> Option<Presented> {
        let mut presented = None;
        let mut ours = false;
        for value in self.pairs(headers) {
            ours = true;
            if presented.is_none() {
                presented = value.and_then(|v| self.check_bytes(v));
            }
        }
        if ours || headers.get_all(COOKIE).iter().nth(1).is_some() || self.behind_a_comma(headers) {
            self.strip_joined(headers);
        }
        drop_cookie2(headers);
        presented
    }

    /// Whether a `Cookie` header holds a session ID behind a comma (`a=1, session=…`),
    /// which commas do not separate but some parsers split on.
    fn behind_a_comma(&self, headers: &HeaderMap) -> bool {
        headers.get_all(COOKIE).iter().any(|field| {
            field.as_bytes().contains(&b',')
                && field
                    .as_bytes()
                    .split(|b| *b == b';')
                    .any(|pair| self.hides_an_id(pair))
        })
    }

    /// Whether a `Cookie` pair holds, behind a comma, a piece that is the session cookie
    /// with an ID as its value (`a=1, session=<id>`). Not inside quotes, and not a bare
    /// name or any other value (`tags=news,session,sports` is one cookie).
    fn hides_an_id(&self, pair: &[u8]) -> bool {
        !pair.contains(&b'"')
            && pair
                .split(|b| *b == b',')
                .skip(1)
                .any(|p| self.is_id_piece(p))
    }

    fn is_id_piece(&self, piece: &[u8]) -> bool {
        piece.iter().position(|b| *b == b'=').is_some_and(|at| {
            piece[..at].trim_ascii() == self.name.as_bytes()
                && self.check_bytes(piece[at + 1..].trim_ascii()).is_some()
        })
    }

    /// Whether the (single) `Cookie` header holds the cookie's name anywhere.
    fn mentioned(&self, headers: &HeaderMap) -> bool {
        headers.get(COOKIE).is_some_and(|field| {
            field
                .as_bytes()
                .windows(self.name.len())
                .any(|w| w == self.name.as_bytes())
        })
    }

    /// The value of every pair named like the session cookie (`None` for a bare name).
    fn pairs<'h>(&'h self, headers: &'h HeaderMap) -> impl Iterator<Item = Option<&'h [u8]>> {
        headers
            .get_all(COOKIE)
            .iter()
            .flat_map(|field| field.as_bytes().split(|b| *b == b';'))
            .filter_map(|pair| {
                let (name, value) = match pair.iter().position(|b| *b == b'=') {
                    Some(at) => (&pair[..at], Some(pair[at + 1..].trim_ascii())),
                    None => (pair, None),
                };
                (name.trim_ascii() == self.name.as_bytes()).then_some(value)
            })
    }

    fn check_bytes(&self, value: &[u8]) -> Option<Presented> {
        self.check(std::str::from_utf8(value).ok()?)
    }

    fn check(&self, value: &str) -> Option<Presented> {
        let Some(signer) = &self.signer else {
            let id = self.shape.parse(value)?;
            return Some(Presented {
                id,
                needs_resign: false,
            });
        };
        let (id, mac) = value.split_once('.')?;
        let id = self.shape.parse(id)?;
        let needs_resign = signer.verify(&id, mac)?;
        Some(Presented { id, needs_resign })
    }

    /// Removes the session cookie from the `Cookie` header(s), leaving every other
    /// cookie byte for byte, joined with `; ` into one header for an HTTP/1.1 upstream
    /// (empty pieces, `;;`, are dropped).
    pub fn strip(&self, headers: &mut HeaderMap) {
        drop_cookie2(headers);
        let mut fields = headers.get_all(COOKIE).iter();
        let (Some(_), None) = (fields.next(), fields.next()) else {
            return self.strip_joined(headers);
        };
        // The common case: one header, maybe without our cookie at all.
        if self.mentioned(headers) {
            self.strip_joined(headers);
        }
    }

    fn strip_joined(&self, headers: &mut HeaderMap) {
        let size = headers.get_all(COOKIE).iter().map(|f| f.len() + 2).sum();
        let mut kept: Vec<u8> = Vec::with_capacity(size);
        for field in headers.get_all(COOKIE) {
            for pair in field.as_bytes().split(|b| *b == b';') {
                let pair = pair.trim_ascii();
                if pair.is_empty() || self.names_it(pair) {
                    continue;
                }
                if !kept.is_empty() {
                    kept.extend_from_slice(b"; ");
                }
                // Commas are not cookie separators, but some parsers split on them: a
                // session ID goes after a comma too (`a=1, session=<id>`).
                if self.hides_an_id(pair) {
                    let mut first = true;
                    let pieces = pair.split(|b| *b == b',');
                    for (i, piece) in pieces.enumerate() {
                        if i > 0 && self.is_id_piece(piece) {
                            continue;
                        }
                        if !first {
                            kept.push(b',');
                        }
                        kept.extend_from_slice(piece);
                        first = false;
                    }
                } else {
                    kept.extend_from_slice(pair);
                }
            }
        }
        if kept.is_empty() {
            headers.remove(COOKIE);
            return;
        }
        // The kept pairs are slices of valid header values, joined by "; ".
        match HeaderValue::from_maybe_shared(Bytes::from(kept)) {
            Ok(value) => {
                headers.insert(COOKIE, value);
            }
            _ => {
                headers.remove(COOKIE);
            }
        }
    }

    /// Whether `pair` (`name=value`, or a bare name) is named like the session cookie.
    fn names_it(&self, pair: &[u8]) -> bool {
        let name = pair.split(|b| *b == b'=').next().unwrap_or(pair);
        name.trim_ascii() == self.name.as_bytes()
    }

    /// `Set-Cookie` that sets the session cookie to `id`.
    pub fn set(&self, id: &SessionId) -> HeaderValue {
        let value = match &self.signer {
            Some(signer) => format!(
                "{}={}.{}{}",
                self.name,
                id.as_str(),
                signer.sign(id),
                self.set_attributes
            ),
            None => format!("{}={}{}", self.name, id.as_str(), self.set_attributes),
        };
        // Name, ID, MAC and attributes were all checked to be header-safe.
        HeaderValue::try_from(value).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// `Set-Cookie` that clears the session cookie (`Max-Age=0`, same Path and Domain).
    pub fn clear(&self) -> HeaderValue {
        HeaderValue::try_from(format!("{}={}", self.name, self.clear_attributes))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Drops `Cookie2` (RFC 2965, obsolete: no browser sends it), which could carry the
/// session ID past the stripping of `Cookie` to a parser that still reads it.
fn drop_cookie2(headers: &mut HeaderMap) {
    headers.remove(COOKIE2);
}

const COOKIE2: HeaderName = HeaderName::from_static("cookie2");

/// Keeps a response that sets or clears the session cookie out of shared caches: its
/// `Cache-Control` gets `private` unless it says `no-store`, and loses `public`,
/// `s-maxage` and any `private="…"` (which lets a shared cache keep the response minus the
/// fields it lists: a bare `private` takes its place). Other directives stay.
/// `Surrogate-Control` and the targeted fields (`CDN-Cache-Control`,
/// `Cloudflare-CDN-Cache-Control`, any `*-Cache-Control`: RFC 9213) go: the CDNs they
/// are meant for obey them in place of `Cache-Control`.
pub fn keep_out_of_shared_caches(headers: &mut HeaderMap) {
    let targeted: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_targeted_cache_field(name))
        .cloned()
        .collect();
    for name in targeted {
        headers.remove(name);
    }
    let mut directives: Vec<String> = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(directives)
        .filter(|d| {
            let (name, argument) = split_directive(d);
            !(name.eq_ignore_ascii_case("public")
                || name.eq_ignore_ascii_case("s-maxage")
                || (name.eq_ignore_ascii_case("private") && argument.is_some()))
        })
        .map(str::to_owned)
        .collect();
    let private = directives.iter().any(|d| {
        let (name, _) = split_directive(d);
        name.eq_ignore_ascii_case("private") || name.eq_ignore_ascii_case("no-store")
    });
    if !private {
        directives.push("private".into());
    }
    headers.remove(CACHE_CONTROL);
    if let Ok(value) = HeaderValue::try_from(directives.join(", ")) {
        headers.insert(CACHE_CONTROL, value);
    }
}

/// Whether a field tells caches other than the client's how to keep the response in
/// place of `Cache-Control` (names are lowercase in a `HeaderMap`; `Cache-Control` itself
/// has no `-` before `cache`).
fn is_targeted_cache_field(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "surrogate-control" || name.ends_with("-cache-control")
}

/// The directives of one `Cache-Control` value, trimmed, split on the commas that are
/// not inside a quoted argument (`private="a, b"` is one directive).
fn directives(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = value;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            let (mut quoted, mut escaped) = (false, false);
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' if quoted => escaped = true,
                        '"' => quoted = !quoted,
                        ',' if !quoted => return true,
                        _ => {}
                    }
                    false
                })
                .map_or(rest.len(), |(i, _)| i);
            let directive = rest[..end].trim();
            rest = rest.get(end + 1..).unwrap_or("");
            if !directive.is_empty() {
                return Some(directive);
            }
        }
    })
}

/// A directive's name and, when it has one, its argument.
fn split_directive(directive: &str) -> (&str, Option<&str>) {
    match directive.split_once('=') {
        Some((name, argument)) => (name.trim(), Some(argument.trim())),
        None => (directive, None),
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Signs session cookies as `<id>.<mac>`: HMAC-SHA256 of the ID, base64url.
#[derive(Clone)]
struct Signer {
    current: HmacSha256,
    fallbacks: Vec<HmacSha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

fn keyed(secret: &str) -> HmacSha256 {
    // HMAC accepts keys of any length.
    <HmacSha256 as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new(&Default::default()))
}

impl Signer {
    fn new(current: &str, fallbacks: &[String]) -> Signer {
        Signer {
            current: keyed(current),
            fallbacks: fallbacks.iter().map(|s| keyed(s)).collect(),
        }
    }

    fn sign(&self, id: &SessionId) -> String {
        let mut mac = self.current.clone();
        mac.update(id.as_str().as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// `Some(false)`: signed with the current secret; `Some(true)`: with a fallback.
    fn verify(&self, id: &SessionId, mac: &str) -> Option<bool> {
        let mut buf = [0u8; 33];
        let n = URL_SAFE_NO_PAD.decode_slice(mac, &mut buf).ok()?;
        let tag = &buf[..n];
        let check = |key: &HmacSha256| {
            let mut mac = key.clone();
            mac.update(id.as_str().as_bytes());
            mac.verify_slice(tag).is_ok()
        };
        if check(&self.current) {
            Some(false)
        } else {
            self.fallbacks.iter().any(check).then_some(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie(config: SessionConfig) -> SessionCookie {
        SessionCookie::new(&config)
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(COOKIE, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn first_well_formed_cookie_wins() {
        let c = cookie(SessionConfig::default());
        let id = SessionId::generate(c.shape());
        let h = headers(&["session=bad; a=1", &format!("session={}", id.as_str())]);
        assert_eq!(c.find(&h).map(|p| p.id), Some(id));
        assert_eq!(c.find(&headers(&["session=\"x\""])), None);
    }

    #[test]
    fn strip_keeps_other_cookies_exactly() {
        let c = cookie(SessionConfig::default());
        let mut h = headers(&["a=1;session=x", "b=\"q r\"; session=y;c=3"]);
        c.strip(&mut h);
        assert_eq!(h.get(COOKIE).unwrap(), "a=1; b=\"q r\"; c=3");
        let mut h = headers(&["session=x"]);
        c.strip(&mut h);
        assert!(h.get(COOKIE).is_none());
        let mut h = headers(&["sessionid=1"]);
        c.strip(&mut h);
        assert_eq!(h.get(COOKIE).unwrap(), "sessionid=1");
    }

    #[test]
    fn take_finds_and_strips_in_one_go() {
        let c = cookie(SessionConfig::default());
        let id = SessionId::generate(c.shape());
        let mut h = headers(&[&format!("a=1; session=bad; session={}; b=2", id.as_str())]);
        assert_eq!(c.take(&mut h).map(|p| p.id), Some(id.clone()));
        assert_eq!(h.get(COOKIE).unwrap(), "a=1; b=2");
        let mut h = headers(&["session; a=1"]);
        assert_eq!(c.take(&mut h), None);
        assert_eq!(h.get(COOKIE).unwrap(), "a=1");
        let mut h = headers(&["a=1;  b=2"]);
        assert_eq!(c.take(&mut h), None);
        assert_eq!(
            h.get(COOKIE).unwrap(),
            "a=1;  b=2",
            "untouched without the cookie"
        );
        let mut h = headers(&["a=1", "b=2"]);
        assert_eq!(c.take(&mut h), None);
        assert_eq!(h.get_all(COOKIE).iter().count(), 1, "joined for HTTP/1.1");
        assert_eq!(h.get(COOKIE).unwrap(), "a=1; b=2");
    }

    #[test]
    fn the_session_id_never_goes_on_after_a_comma_or_in_cookie2() {
        let c = cookie(SessionConfig::default());
        let id = SessionId::generate(c.shape());
        for comma in [
            format!("a=1, session={}", id.as_str()),
            format!("a=1,session={},b=2", id.as_str()),
        ] {
            let mut h = headers(&[&comma]);
            h.insert(COOKIE2, HeaderValue::from_static("session=x"));
            // Not taken for the session (commas do not separate cookies)...
            assert_eq!(c.take(&mut h), None, "{comma}");
            // ...but not passed on either.
            let left = h.get(COOKIE).unwrap().to_str().unwrap().to_string();
            assert!(!left.contains(id.as_str()), "{comma} -> {left}");
            assert!(left.starts_with("a=1"), "{comma} -> {left}");
            assert!(h.get(COOKIE2).is_none());
            let mut h = headers(&[&comma, "c=3"]);
            h.insert(COOKIE2, HeaderValue::from_static("session=x"));
            c.strip(&mut h);
            let left = h.get(COOKIE).unwrap().to_str().unwrap().to_string();
            assert!(
                !left.contains(id.as_str()) && left.ends_with("c=3"),
                "{left}"
            );
            assert!(h.get(COOKIE2).is_none());
        }
        // Other cookies that hold commas, or the name without an ID, are left exactly as
        // they are.
        for other in [
            "a=1,2; b=x, y",
            "tags=news,session,sports",
            "consent=ads,session=1,stats",
            "a=1, session=x;  b=2",
        ] {
            let mut h = headers(&[other]);
            assert_eq!(c.take(&mut h), None);
            assert_eq!(h.get(COOKIE).unwrap(), other);
        }
        let quoted = format!("prefs=\"theme=dark,session={}\"; a=1", id.as_str());
        let mut h = headers(&[&quoted]);
        c.take(&mut h);
        assert_eq!(h.get(COOKIE).unwrap(), quoted.as_str(), "quotes kept whole");
    }

    #[test]
    fn attributes_are_rendered_as_configured() {
        let c = cookie(SessionConfig {
            domain: Some("example.com".into()),
            same_site: SameSite::None,
            max_age: 60,
            ..SessionConfig::default()
        });
        let id = SessionId::generate(c.shape());
        assert_eq!(
            c.set(&id),
            format!(
                "session={}; Max-Age=60; Path=/; Domain=example.com; Secure; HttpOnly; SameSite=None",
                id.as_str()
            )
            .as_str()
        );
        assert_eq!(
            c.clear(),
            "session=; Max-Age=0; Path=/; Domain=example.com; Secure; HttpOnly; SameSite=None"
        );
    }

    #[test]
    fn shared_caches_are_kept_off() {
        let mut h = HeaderMap::new();
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=60, s-maxage=300"),
        );
        keep_out_of_shared_caches(&mut h);
        assert_eq!(h.get(CACHE_CONTROL).unwrap(), "max-age=60, private");
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        keep_out_of_shared_caches(&mut h);
        assert_eq!(h.get(CACHE_CONTROL).unwrap(), "no-store");
        // A qualified `private` still lets a shared cache store the response.
        let mut h = HeaderMap::new();
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static(r#"private="set-cookie, x-a", max-age=5"#),
        );
        h.append(
            CACHE_CONTROL,
            HeaderValue::from_static(r#"no-cache="a\",b""#),
        );
        keep_out_of_shared_caches(&mut h);
        assert_eq!(
            h.get(CACHE_CONTROL).unwrap(),
            r#"max-age=5, no-cache="a\",b", private"#
        );
    }

    #[test]
    fn signed_cookies_verify_and_fallbacks_ask_for_resigning() {
        let old = cookie(SessionConfig {
            secret: Some("old-secret-0123456789".into()),
            ..SessionConfig::default()
        });
        let new = cookie(SessionConfig {
            secret: Some("new-secret-0123456789".into()),
            secret_fallbacks: vec!["old-secret-0123456789".into()],
            ..SessionConfig::default()
        });
        let id = SessionId::generate(new.shape());
        let value = |c: &SessionCookie| {
            c.set(&id)
                .to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .to_string()
        };
        let signed_new = value(&new);
        let signed_old = value(&old);
        assert!(!new.find(&headers(&[&signed_new])).unwrap().needs_resign);
        assert!(new.find(&headers(&[&signed_old])).unwrap().needs_resign);
        assert_eq!(old.find(&headers(&[&signed_new])), None);
        let bare = format!("session={}", id.as_str());
        assert_eq!(new.find(&headers(&[&bare])), None);
        let truncated = &signed_new[..signed_new.len() - 2];
        assert_eq!(new.find(&headers(&[truncated])), None);
    }
}
