//! The protocol headers: their configured names, stripping them wherever they must not
//! pass, and reading the application's answer from a response.

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::codec::{self, Update, Violation};
use crate::config::SessionConfig;

/// The names of every header the proxy interprets.
#[derive(Clone, Debug)]
pub struct ProtocolHeaders {
    /// The session, to the application.
    pub request: HeaderName,
    /// The session's public handle, to the application.
    pub handle: HeaderName,
    update: HeaderName,
    patch: HeaderName,
    rotate: HeaderName,
    /// A configured name holds punctuation other than `-` (`X_Session`): then its
    /// look-alikes, `X-Session` among them, are looked for in every request.
    odd_names: bool,
}

impl ProtocolHeaders {
    /// Configuration has validated the names; an invalid one falls back to the default.
    pub fn new(config: &SessionConfig) -> ProtocolHeaders {
        let name = |value: &str, default: &'static str| {
            HeaderName::try_from(value).unwrap_or(HeaderName::from_static(default))
        };
        let mut headers = ProtocolHeaders {
            request: name(&config.request_header, "x-session"),
            handle: name(&config.handle_header, "x-session-handle"),
            update: name(&config.update_header, "x-session-update"),
            patch: name(&config.patch_header, "x-session-patch"),
            rotate: name(&config.rotate_header, "x-session-rotate"),
            odd_names: false,
        };
        headers.odd_names = headers.names().iter().any(|n| has_punctuation(n));
        headers
    }

    /// Removes every protocol header: from client requests (a client can never inject
    /// session data) and from responses (the client never sees them). Look-alikes go
    /// too: names that read as a protocol header, or as one of the `X-Forwarded-*` the
    /// proxy sets, once every byte other than a letter or digit reads as `-`, as CGI,
    /// WSGI and FastCGI servers read them (`X_Session`, `X.Session` and `X~Session` all
    /// become `HTTP_X_SESSION` there).
    pub fn strip(&self, headers: &mut HeaderMap) {
        let (mut exact, mut alike) = (false, self.odd_names);
        for name in headers.keys() {
            exact |= self.names().contains(&name);
            alike |= has_punctuation(name);
        }
        if exact {
            for name in self.names() {
                headers.remove(name);
            }
        }
        if alike {
            let alikes: Vec<HeaderName> = headers
                .keys()
                .filter(|name| self.reads_as_ours(name))
                .cloned()
                .collect();
            for name in alikes {
                headers.remove(name);
            }
        }
    }

    /// Whether `name` reads as a protocol header, or as an `X-Forwarded-*` the proxy sets,
    /// once every byte other than a letter or digit reads as `-` (the `X-Forwarded-*`
    /// themselves, which the proxy handles, excepted).
    fn reads_as_ours(&self, name: &HeaderName) -> bool {
        if FORWARDED.contains(&name.as_str()) {
            return false;
        }
        let same = |ours: &str| {
            ours.len() == name.as_str().len()
                && name
                    .as_str()
                    .bytes()
                    .map(dashed)
                    .eq(ours.bytes().map(dashed))
        };
        self.names().iter().any(|ours| same(ours.as_str())) || FORWARDED.iter().any(|f| same(f))
    }

    /// Every protocol header's name.
    pub fn names(&self) -> [&HeaderName; 5] {
        [
            &self.request,
            &self.handle,
            &self.update,
            &self.patch,
            &self.rotate,
        ]
    }

    /// Usually none is there: one scan of the names is cheaper than five lookups.
    fn any_in(&self, headers: &HeaderMap) -> bool {
        headers.keys().any(|name| self.names().contains(&name))
    }

    /// Takes the application's session headers out of a response and checks them.
    /// The headers are removed whether or not they are valid.
    pub fn take_answer(
        &self,
        headers: &mut HeaderMap,
        max_bytes: usize,
    ) -> Result<Answer, Violation> {
        if !self.any_in(headers) {
            return Ok(Answer {
                change: Change::Nothing,
                rotate: false,
            });
        }
        let update = take_one(headers, &self.update, "update");
        let patch = take_one(headers, &self.patch, "patch");
        let rotate = take_one(headers, &self.rotate, "rotate");
        headers.remove(&self.request);
        headers.remove(&self.handle);
        let change = match (update?, patch?) {
            (Some(_), Some(_)) => return Err(Violation::UpdateAndPatch),
            (Some(update), None) => match codec::decode_update(&update, max_bytes)? {
                Update::Replace(data) => Change::Replace(data),
                Update::Destroy => Change::Destroy,
            },
            (None, Some(patch)) => Change::Patch(codec::decode_patch(&patch, max_bytes)?),
            (None, None) => Change::Nothing,
        };
        let rotate = match rotate? {
            None => false,
            Some(v) if v.as_bytes().trim_ascii() == b"1" => true,
            Some(_) => return Err(Violation::BadRotate),
        };
        Ok(Answer { change, rotate })
    }
}

fn take_one(
    headers: &mut HeaderMap,
    name: &HeaderName,
    what: &'static str,
) -> Result<Option<HeaderValue>, Violation> {
    let mut values = match headers.entry(name) {
        http::header::Entry::Occupied(entry) => entry.remove_entry_mult().1,
        http::header::Entry::Vacant(_) => return Ok(None),
    };
    let first = values.next();
    if values.next().is_some() {
        return Err(Violation::Repeated(what));
    }
    Ok(first)
}

/// The `X-Forwarded-*` fields the proxy sets.
const FORWARDED: [&str; 3] = ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"];

/// Removes from a client's request the forwarding information about the connection that
/// the proxy alone can give, in the fields other proxies and CDNs use for it: the
/// client's address (`Forwarded`, `X-Real-IP`, `True-Client-IP`, …), the scheme, port
/// and path prefix the client used (`X-Forwarded-Port`, `X-Forwarded-Prefix`, …), and
/// the original-URL overrides (`X-Original-URL`, `X-Rewrite-URL`), with their
/// look-alikes. An application that reads them would take the client's word for it, and
/// some (`Forwarded`) are read before the `X-Forwarded-*` the proxy sets. Fields a proxy
/// in front adds about who the user is (`X-Forwarded-User`, `-Email`, `-Groups` from
/// oauth2-proxy, Envoy's `X-Forwarded-Client-Cert`) are that proxy's to vouch for, and
/// pass.
pub fn strip_foreign_forwarding(headers: &mut HeaderMap) {
    remove_where(headers, is_foreign_forwarding);
}

/// The same behind a proxy of the operator's that sets them (`trust_forwarded`):
/// `X-Forwarded-Port` and `X-Forwarded-Prefix`, which ingresses set along with
/// `X-Forwarded-Proto` and `-Host`, pass as it sent them. The others (`Forwarded`, the
/// client-address fields, the URL overrides) are still removed: many ingresses pass on
/// what a client wrote in them.
pub fn strip_untrusted_forwarding(headers: &mut HeaderMap) {
    remove_where(headers, |name| {
        is_foreign_forwarding(name)
            && !matches!(name.as_str(), "x-forwarded-port" | "x-forwarded-prefix")
    });
}

/// Removes from a client's request the look-alikes of the fields that frame its body
/// (`Content_Length`, `Transfer.Encoding`, read as described at [`ProtocolHeaders::strip`]):
/// servers that read names the CGI way (Unicorn, Thin) take `Content_Length` for
/// `CONTENT_LENGTH` and would size the body by a length the proxy never framed it with.
/// The real fields are the proxy's to check, and are framed anew on the way.
pub fn strip_framing_look_alikes(headers: &mut HeaderMap) {
    remove_where(headers, is_framing_look_alike);
}

/// Removes every field whose name `unwanted` picks.
fn remove_where(headers: &mut HeaderMap, unwanted: fn(&HeaderName) -> bool) {
    // Usually none is there: one scan of the names, and nothing collected.
    if !headers.keys().any(unwanted) {
        return;
    }
    let picked: Vec<HeaderName> = headers.keys().filter(|n| unwanted(n)).cloned().collect();
    for name in picked {
        headers.remove(name);
    }
}

/// The fields that frame a request's body.
const FRAMING: [&str; 2] = ["content-length", "transfer-encoding"];

/// Whether a name reads as a framing field without being one: only punctuation sets the
/// two apart.
fn is_framing_look_alike(name: &HeaderName) -> bool {
    has_punctuation(name)
        && FRAMING.iter().any(|framing| {
            name.as_str().len() == framing.len()
                && name.as_str().bytes().map(dashed).eq(framing.bytes())
        })
}

/// Connection facts other proxies and CDNs forward, besides the `X-Forwarded-*` the
/// proxy sets.
const FOREIGN: [&str; 24] = [
    "forwarded",
    "x-forwarded",
    "forwarded-for",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-protocol",
    "x-forwarded-uri",
    "x-forwarded-path",
    "front-end-https",
    "x-url-scheme",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "x-original-url",
    "x-rewrite-url",
    "x-original-host",
];

fn is_foreign_forwarding(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    // Every name in `FOREIGN` starts with one of these: most fields are ruled out at once.
    if !matches!(name.first(), Some(b'f' | b'x' | b't' | b'c')) {
        return false;
    }
    FOREIGN.iter().any(|foreign| {
        name.len() == foreign.len() && name.iter().map(|b| dashed(*b)).eq(foreign.bytes())
    })
}

/// A name's byte as servers that turn names into variables read it: letters and digits
/// stay, anything else is a separator.
fn dashed(b: u8) -> u8 {
    if b.is_ascii_alphanumeric() { b } else { b'-' }
}

/// Whether a name holds a byte other than a letter, a digit or `-`.
fn has_punctuation(name: &HeaderName) -> bool {
    name.as_str()
        .bytes()
        .any(|b| !(b.is_ascii_alphanumeric() || b == b'-'))
}

/// What the application asked for in its response.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub change: Change,
    /// `X-Session-Rotate: 1`: move the session to a fresh ID.
    pub rotate: bool,
}

/// The change to the session's data.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Nothing,
    Replace(bytes::Bytes),
    Destroy,
    /// A JSON merge patch, always an object.
    Patch(Value),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_information_the_proxy_does_not_give_is_removed() {
        assert!(
            FOREIGN
                .iter()
                .all(|f| matches!(f.as_bytes()[0], b'f' | b'x' | b't' | b'c')),
            "is_foreign_forwarding's first-letter filter must cover every name"
        );
        let mut h = HeaderMap::new();
        for name in [
            "forwarded",
            "x-real-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x_forwarded_server",
            "x.real.ip",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded",
            "forwarded-for",
            "accept",
            "true-client-ip",
            "client_ip",
            "x-original-url",
            "x-forwarded-user",
            "x-forwarded-email",
            "x-forwarded-client-cert",
        ] {
            h.insert(
                HeaderName::try_from(name).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        strip_foreign_forwarding(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "accept",
                "x-forwarded-client-cert",
                "x-forwarded-email",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "x-forwarded-user"
            ]
        );
    }
}
