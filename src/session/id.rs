//! Session IDs and the public handles derived from them.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use sha2::{Digest, Sha256};

/// A session ID the proxy generated: `id_bytes` random bytes from a CSPRNG, encoded
/// base64url without padding.
///
/// A `SessionId` can only be made by [`SessionId::generate`] or by [`IdShape::parse`],
/// which accepts nothing but the exact shape of a generated ID. No code path can
/// therefore reach the store with an ID a client made up in some other form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId(Box<str>);

impl SessionId {
    /// A fresh ID from the thread-local CSPRNG.
    pub fn generate(shape: IdShape) -> SessionId {
        let mut bytes = [0u8; IdShape::MAX_BYTES];
        let bytes = &mut bytes[..shape.bytes];
        rand::rng().fill_bytes(bytes);
        SessionId(URL_SAFE_NO_PAD.encode(bytes).into_boxed_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The public handle of this session: a hash of the ID that reveals nothing of it.
    /// Applications and operators use it to name a session without holding its ID.
    pub fn handle(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        URL_SAFE_NO_PAD.encode(&digest[..16])
    }

    /// A short tag for logs: enough to follow one session through the access log,
    /// too short to name it anywhere else.
    pub fn log_tag(&self) -> String {
        let mut handle = self.handle();
        handle.truncate(8);
        handle
    }
}

/// IDs never appear in logs or debug output.
impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.log_tag())
    }
}

/// The shape of the IDs this proxy generates: how many random bytes they carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdShape {
    bytes: usize,
}

impl IdShape {
    pub const MIN_BYTES: usize = 16;
    pub const MAX_BYTES: usize = 64;

    /// `bytes` must lie in `MIN_BYTES..=MAX_BYTES`; configuration validates it first.
    pub fn new(bytes: usize) -> Option<IdShape> {
        (Self::MIN_BYTES..=Self::MAX_BYTES)
            .contains(&bytes)
            .then_some(IdShape { bytes })
    }

    /// Length of the encoded ID: base64url without padding.
    pub fn encoded_len(self) -> usize {
        (self.bytes * 4).div_ceil(3)
    }

    /// Accepts `value` only if it has exactly the shape of a generated ID: the right
    /// length, the base64url alphabet, and canonical trailing bits.
    pub fn parse(self, value: &str) -> Option<SessionId> {
        if value.len() != self.encoded_len() {
            return None;
        }
        let mut buf = [0u8; Self::MAX_BYTES + 3];
        let decoded = URL_SAFE_NO_PAD.decode_slice(value, &mut buf).ok()?;
        (decoded == self.bytes).then(|| SessionId(value.into()))
    }
}

impl Default for IdShape {
    fn default() -> Self {
        IdShape { bytes: 32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_have_the_configured_shape_and_parse_back() {
        for bytes in [16, 32, 64] {
            let shape = IdShape::new(bytes).unwrap();
            let id = SessionId::generate(shape);
            assert_eq!(id.as_str().len(), shape.encoded_len());
            assert_eq!(shape.parse(id.as_str()), Some(id));
        }
        assert_eq!(IdShape::default().encoded_len(), 43);
    }

    #[test]
    fn ids_are_not_repeated() {
        let shape = IdShape::default();
        let a = SessionId::generate(shape);
        let b = SessionId::generate(shape);
        assert_ne!(a, b);
    }

    #[test]
    fn wrong_length_alphabet_or_trailing_bits_are_rejected() {
        let shape = IdShape::default();
        let good = SessionId::generate(shape);
        let s = good.as_str();
        assert!(shape.parse(&s[..42]).is_none());
        assert!(shape.parse(&format!("{s}A")).is_none());
        assert!(shape.parse(&format!("{}+", &s[..42])).is_none());
        assert!(shape.parse(&format!("{}=", &s[..42])).is_none());
        assert!(shape.parse("").is_none());
        // 32 bytes leave 4 unused bits in the last character: 'B' sets one of them.
        assert!(shape.parse(&format!("{}B", &"A".repeat(42))).is_none());
        assert!(shape.parse(&format!("{}A", &"A".repeat(42))).is_some());
        assert!(shape.parse(&"é".repeat(21)).is_none());
    }

    #[test]
    fn debug_output_never_shows_the_id() {
        let id = SessionId::generate(IdShape::default());
        assert!(!format!("{id:?}").contains(id.as_str()));
    }

    #[test]
    fn id_bytes_outside_16_to_64_are_refused() {
        assert!(IdShape::new(15).is_none());
        assert!(IdShape::new(65).is_none());
    }
}
