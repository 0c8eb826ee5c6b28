//! Session storage: one small trait, one file per backend.
//!
//! The proxy talks to a `dyn Store` and never knows which backend is behind it. Every
//! operation the request path and the admin port need is here, each one atomic on its
//! own: a write either happened completely or returned an error.

pub mod memory;
pub mod metered;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::Value;

use crate::session::codec::{self, Merged};
use crate::session::id::SessionId;

/// What every store operation returns, boxed so that `Store` stays object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a store operation failed. The proxy answers 503 for all of them except
/// `TooLarge`, which is the application's fault (502).
#[derive(Debug)]
pub enum StoreError {
    /// The backend did not answer, or answered with an error.
    Unavailable(String),
    /// The memory store holds `store.max_sessions` sessions: a new one is refused.
    Full,
    /// Concurrent writers kept changing the session while a patch or a rotation was
    /// being applied.
    Contended,
    /// A patch would make the session larger than `session.max_bytes`.
    TooLarge(usize),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "session store unavailable: {why}"),
            StoreError::Full => f.write_str("session store full (store.max_sessions reached)"),
            StoreError::Contended => f.write_str(
                "session changed concurrently too many times while patching or rotating it",
            ),
            StoreError::TooLarge(n) => {
                write!(
                    f,
                    "patched session is {n} bytes, more than session.max_bytes"
                )
            }
        }
    }
}

impl std::error::Error for StoreError {}

/// A stored session as the request path sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The session as a JSON object; never `{}` (an empty session is no session).
    pub data: Bytes,
    /// Creation time, unix seconds. Kept across rotation.
    pub created: u64,
    /// The session was rotated away: this ID lives out its grace period, and its cookie
    /// must not be handed out again.
    pub moved: bool,
}

/// Most rotations followed from a rotated-away ID to the session it moved to: a chain
/// longer than this (eight rotations within one grace period) counts as ended.
pub(crate) const SUCCESSOR_HOPS: usize = 8;

/// Most passes over a user's index one revocation makes (see `Store::revoke_user`).
pub(crate) const REVOKE_PASSES: usize = 8;

/// What became of a rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotated {
    Done,
    /// The session had already been rotated away from this ID (by a request that ended
    /// first): nothing was moved again.
    Moved,
    /// No session under the old ID, or it ended while being moved: nothing was moved.
    Missing,
}

/// Where a replacement or a deletion landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Landed {
    Done,
    /// On an ID rotated away meanwhile: the copy it left for its grace period. The session
    /// itself lives on under its new ID.
    Moved,
    /// No session is stored under the ID; nothing was written or deleted.
    Missing,
}

/// A session about to be stored for the first time (or under a rotated ID).
#[derive(Clone, Debug)]
pub struct NewSession {
    pub data: Bytes,
    pub created: u64,
    /// Unix seconds at which the session ends whatever its activity, if ever.
    pub ends: Option<u64>,
}

/// One session of a user, as the admin port lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SessionInfo {
    pub handle: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last write or renewal.
    pub last_seen: u64,
}

/// The result of an atomic patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatchOutcome {
    /// The session now holds this data.
    Updated(Bytes),
    /// The same, under an ID rotated away meanwhile: it ends with its grace period. Empty
    /// when the patch emptied that copy, which was deleted.
    Moved(Bytes),
    /// The patch emptied the session: it was deleted.
    Destroyed,
    /// No session is stored under the ID; nothing was written.
    Missing,
}

/// Settings every backend applies in the same way.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// TTL of every write and renewal (`session.max_age`).
    pub max_age: Duration,
    /// Top-level key of the session JSON that names its user (`session.user_key`).
    pub user_key: Option<String>,
    /// Largest session a patch may produce (`session.max_bytes`).
    pub max_bytes: usize,
}

impl StoreSettings {
    /// The TTL a session gets now: `max_age`, cut short by its end if it has one.
    /// `None` when the session has already ended.
    pub fn ttl(&self, ends: Option<u64>, now: Duration) -> Option<Duration> {
        match ends {
            None => Some(self.max_age),
            Some(ends) => {
                let left = Duration::from_secs(ends).checked_sub(now)?;
                (!left.is_zero()).then(|| left.min(self.max_age))
            }
        }
    }

    /// The user a session belongs to, when `user_key` is set and present in `data`.
    pub fn user_of(&self, data: &[u8]) -> Option<String> {
        codec::user_of(data, self.user_key.as_deref()?)
    }

    /// Merges `patch` into `stored` under the size limit.
    pub fn merge(&self, stored: Option<&[u8]>, patch: &Value) -> Result<Merged, StoreError> {
        codec::merge_patch(stored, patch, self.max_bytes).map_err(StoreError::TooLarge)
    }
}

/// The storage a proxy keeps sessions in.
pub trait Store: Send + Sync + 'static {
    /// Reads a session. With `renew`, resets its TTL (capped by its end) without
    /// rewriting the data.
    fn load<'a>(&'a self, id: &'a SessionId, renew: bool) -> StoreFuture<'a, Option<Record>>;

    /// Stores a new session under a freshly generated ID.
    fn create<'a>(&'a self, id: &'a SessionId, session: NewSession) -> StoreFuture<'a, ()>;

    /// Replaces the data of an existing session and resets its TTL.
    fn replace<'a>(&'a self, id: &'a SessionId, data: Bytes) -> StoreFuture<'a, Landed>;

    /// Merges a JSON merge patch (RFC 7396) into the session as stored, atomically:
    /// concurrent patches never lose each other's changes.
    fn patch<'a>(&'a self, id: &'a SessionId, patch: &'a Value) -> StoreFuture<'a, PatchOutcome>;

    /// Whether `id` names a live session that was not rotated away: one whose cookie may
    /// be sent again. (A request that started before a rotation answers after it.)
    fn current<'a>(&'a self, id: &'a SessionId) -> StoreFuture<'a, bool>;

    /// Deletes a session; deleting a missing one is not an error.
    fn delete<'a>(&'a self, id: &'a SessionId) -> StoreFuture<'a, Landed>;

    /// Moves the session stored under `old` to `new`, keeping its creation time and end.
    /// `old` stays readable for `grace`, then disappears. If `old` ends while it is being
    /// moved (deleted, revoked), `new` ends too.
    fn rotate<'a>(
        &'a self,
        old: &'a SessionId,
        new: &'a SessionId,
        grace: Duration,
    ) -> StoreFuture<'a, Rotated>;

    /// The live sessions of a user.
    fn user_sessions<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<SessionInfo>>;

    /// Ends every session of a user, including those indexed under the user while this
    /// runs (a rotation's new ID); returns how many were ended.
    fn revoke_user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, usize>;

    /// Ends the session with this public handle; `Ok(false)` when none has it.
    fn revoke_handle<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, bool>;

    /// Succeeds when the store answers.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// Number of sessions held, where the backend can tell cheaply (memory store).
    fn session_count(&self) -> Option<usize> {
        None
    }
}

/// When an ID rotated away at `now` ends: after the grace period, unless the session's
/// absolute end (`ends`, unix seconds) comes first.
pub fn grace_until(now: Duration, grace: Duration, ends: Option<u64>) -> Duration {
    let until = now + grace;
    ends.map_or(until, |ends| until.min(Duration::from_secs(ends)))
}

/// `at` in whole unix seconds, rounded up: the `ends` of a grace period, so that it is
/// never shorter than asked for. The store's own expiry (in milliseconds) keeps it from
/// lasting longer.
pub fn secs_up(at: Duration) -> u64 {
    at.as_secs() + u64::from(at.subsec_nanos() > 0)
}

/// Now, as a duration since the unix epoch.
pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
