//! The header protocol between proxy and application: the session as base64 JSON in
//! `X-Session`, and the application's `X-Session-Update` / `X-Session-Patch` answers.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Map, Value};

/// `X-Session` for a request without a session: base64 of `{}`.
pub const EMPTY_SESSION: HeaderValue = HeaderValue::from_static("e30=");

/// The session as the application receives it.
pub fn encode(data: &[u8]) -> HeaderValue {
    let encoded = STANDARD.encode(data);
    // Standard base64 uses only visible ASCII, always a valid header value.
    HeaderValue::try_from(encoded).unwrap_or(EMPTY_SESSION)
}

/// Why an application's session header was refused. The client gets 502 and the stored
/// session stays as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    NotBase64,
    NotJson(String),
    NotAnObject,
    TooLarge {
        bytes: usize,
        max: usize,
    },
    /// A patch longer than twice `max` (its result must fit `max`).
    PatchTooLarge {
        bytes: usize,
        max: usize,
    },
    Repeated(&'static str),
    UpdateAndPatch,
    BadRotate,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::NotBase64 => f.write_str("session header is not standard padded base64"),
            Violation::NotJson(e) => write!(f, "session header is not valid JSON: {e}"),
            Violation::NotAnObject => f.write_str("session header is not a JSON object"),
            Violation::TooLarge { bytes, max } => write!(
                f,
                "session of {bytes} bytes is larger than session.max_bytes ({max})"
            ),
            Violation::PatchTooLarge { bytes, max } => write!(
                f,
                "patch of {bytes} bytes is larger than twice session.max_bytes ({max})"
            ),
            Violation::Repeated(which) => write!(f, "{which} header sent more than once"),
            Violation::UpdateAndPatch => {
                f.write_str("update and patch headers sent together; send one of them")
            }
            Violation::BadRotate => f.write_str("rotate header must be exactly \"1\""),
        }
    }
}

/// What `X-Session-Update` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Replace the whole session with this JSON object (compact, never `{}`).
    Replace(Bytes),
    /// `{}`: destroy the session.
    Destroy,
}

/// Decodes an `X-Session-Update` value.
pub fn decode_update(value: &HeaderValue, max_bytes: usize) -> Result<Update, Violation> {
    let object = decode_object(value, max_bytes)?;
    if object.is_empty() {
        return Ok(Update::Destroy);
    }
    // What is stored is the compact form, which can be longer than what was sent
    // (`1E5` is written `1e+5`): the limit holds for the stored bytes.
    let data = compact(&object);
    if data.len() > max_bytes {
        return Err(Violation::TooLarge {
            bytes: data.len(),
            max: max_bytes,
        });
    }
    Ok(Update::Replace(data))
}

/// Decodes an `X-Session-Patch` value: a JSON merge patch, which must be an object.
/// Its *result* must fit `max_bytes` (checked when it is merged); the patch itself may be
/// up to twice that, so that one patch can delete every key of a full session
/// (`{"k":null}` is longer than the `"k":1` it removes, by at most half).
pub fn decode_patch(value: &HeaderValue, max_bytes: usize) -> Result<Value, Violation> {
    match decode_object(value, max_bytes.saturating_mul(2)) {
        Ok(object) => Ok(Value::Object(object)),
        Err(Violation::TooLarge { bytes, .. }) => Err(Violation::PatchTooLarge {
            bytes,
            max: max_bytes,
        }),
        Err(e) => Err(e),
    }
}

fn decode_object(value: &HeaderValue, max_bytes: usize) -> Result<Map<String, Value>, Violation> {
    let encoded = value.as_bytes();
    // Refuse before decoding: base64 is 4 bytes for every 3.
    let decoded_len = encoded.len() / 4 * 3;
    if decoded_len > max_bytes + 2 {
        return Err(Violation::TooLarge {
            bytes: decoded_len,
            max: max_bytes,
        });
    }
    let json = STANDARD.decode(encoded).map_err(|_| Violation::NotBase64)?;
    if json.len() > max_bytes {
        return Err(Violation::TooLarge {
            bytes: json.len(),
            max: max_bytes,
        });
    }
    match serde_json::from_slice::<Value>(&json) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Violation::NotAnObject),
        Err(e) => Err(Violation::NotJson(e.to_string())),
    }
}

fn compact(object: &Map<String, Value>) -> Bytes {
    // Serialising a `Value` built by serde_json cannot fail.
    Bytes::from(serde_json::to_vec(object).unwrap_or_else(|_| b"{}".to_vec()))
}

/// The result of merging a patch into a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merged {
    /// The session's new JSON.
    Data(Bytes),
    /// The result is `{}`: the session is to be destroyed.
    Empty,
}

/// Applies a JSON merge patch (RFC 7396) to `stored` (`None`: no session yet).
/// `Err(n)` when the result, `n` bytes, would exceed `max_bytes`.
pub fn merge_patch(
    stored: Option<&[u8]>,
    patch: &Value,
    max_bytes: usize,
) -> Result<Merged, usize> {
    // Stored sessions were written by the proxy and are valid JSON objects; should one
    // be corrupted outside the proxy, the patch applies to an empty session instead.
    let mut target = stored
        .and_then(|s| serde_json::from_slice::<Value>(s).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| Value::Object(Map::new()));
    merge(&mut target, patch);
    match target {
        Value::Object(object) if object.is_empty() => Ok(Merged::Empty),
        Value::Object(object) => {
            let data = compact(&object);
            if data.len() > max_bytes {
                return Err(data.len());
            }
            Ok(Merged::Data(data))
        }
        // A patch that is an object always leaves an object.
        _ => Ok(Merged::Empty),
    }
}

fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.shift_remove(key);
            } else {
                merge(target.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

/// The user named by `key` at the top level of the session JSON: a string, or a number
/// written as in the JSON.
pub fn user_of(data: &[u8], key: &str) -> Option<String> {
    let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(data) else {
        return None;
    };
    match object.shift_remove(key)? {
        Value::String(user) if !user.is_empty() => Some(user),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(json: &str) -> HeaderValue {
        HeaderValue::try_from(STANDARD.encode(json)).unwrap()
    }

    #[test]
    fn update_replaces_or_destroys() {
        assert_eq!(
            decode_update(&header(r#"{ "a" : 1 }"#), 100),
            Ok(Update::Replace(Bytes::from_static(br#"{"a":1}"#)))
        );
        assert_eq!(decode_update(&header("{}"), 100), Ok(Update::Destroy));
    }

    #[test]
    fn one_patch_can_empty_a_full_session() {
        // A session of exactly max_bytes, of the shortest keys and values: deleting all of
        // them takes the longest patch there is for its size.
        let keys: Vec<String> = (0..30).map(|n| format!("{n:x}")).collect();
        let stored = format!(
            "{{{}}}",
            keys.iter()
                .map(|k| format!(r#""{k}":1"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let max = stored.len();
        let patch = format!(
            "{{{}}}",
            keys.iter()
                .map(|k| format!(r#""{k}":null"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(patch.len() > max);
        let patch = decode_patch(&header(&patch), max).unwrap();
        assert_eq!(
            merge_patch(Some(stored.as_bytes()), &patch, max),
            Ok(Merged::Empty)
        );
        let twice = format!(r#"{{"a":"{}"}}"#, "x".repeat(2 * max));
        assert!(matches!(
            decode_patch(&header(&twice), max),
            Err(Violation::PatchTooLarge { .. })
        ));
    }

    #[test]
    fn invalid_updates_are_violations() {
        assert_eq!(
            decode_update(&HeaderValue::from_static("%%%"), 100),
            Err(Violation::NotBase64)
        );
        assert!(matches!(
            decode_update(&header("{"), 100),
            Err(Violation::NotJson(_))
        ));
        assert_eq!(
            decode_update(&header("[1]"), 100),
            Err(Violation::NotAnObject)
        );
        assert_eq!(
            decode_update(&header("\"s\""), 100),
            Err(Violation::NotAnObject)
        );
        assert!(matches!(
            decode_update(&header(&format!(r#"{{"a":"{}"}}"#, "x".repeat(200))), 100),
            Err(Violation::TooLarge { .. })
        ));
    }

    #[test]
    fn the_limit_holds_for_the_stored_form() {
        // 16 bytes as sent, 17 once compacted (`1E400` → `1e+400`).
        let sent = r#"{"id":12371E400}"#;
        assert_eq!(sent.len(), 16);
        assert!(matches!(
            decode_update(&header(sent), 16),
            Err(Violation::TooLarge { bytes: 17, .. })
        ));
        assert!(decode_update(&header(sent), 17).is_ok());
    }

    #[test]
    fn big_numbers_and_empty_arrays_survive() {
        let Ok(Update::Replace(data)) = decode_update(
            &header(r#"{"id":12345678901234567890123,"l":[],"f":0.1}"#),
            100,
        ) else {
            panic!("not a replace")
        };
        assert_eq!(
            &data[..],
            br#"{"id":12345678901234567890123,"l":[],"f":0.1}"#
        );
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let patch: Value = serde_json::from_str(r#"{"a":"z","c":{"f":null},"n":[1]}"#).unwrap();
        let merged = merge_patch(Some(br#"{"a":"b","c":{"d":"e","f":"g"}}"#), &patch, 100);
        assert_eq!(
            merged,
            Ok(Merged::Data(Bytes::from_static(
                br#"{"a":"z","c":{"d":"e"},"n":[1]}"#
            )))
        );
        let delete_all: Value = serde_json::from_str(r#"{"a":null}"#).unwrap();
        assert_eq!(
            merge_patch(Some(br#"{"a":1}"#), &delete_all, 100),
            Ok(Merged::Empty)
        );
        assert_eq!(merge_patch(None, &delete_all, 100), Ok(Merged::Empty));
        let big: Value = serde_json::from_str(r#"{"a":"0123456789"}"#).unwrap();
        assert_eq!(merge_patch(None, &big, 10), Err(18));
    }

    #[test]
    fn user_is_read_from_the_top_level() {
        assert_eq!(user_of(br#"{"uid":"ann"}"#, "uid"), Some("ann".into()));
        assert_eq!(user_of(br#"{"uid":42}"#, "uid"), Some("42".into()));
        assert_eq!(user_of(br#"{"x":{"uid":"ann"}}"#, "uid"), None);
        assert_eq!(user_of(br#"{"uid":null}"#, "uid"), None);
    }
}
