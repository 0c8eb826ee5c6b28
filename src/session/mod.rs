//! The session rules: IDs, the cookie, the header protocol and exclusions.

pub mod codec;
pub mod cookie;
pub mod exclude;
pub mod id;
pub mod protocol;
