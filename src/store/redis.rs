//! The Redis store: every session is one hash under `key_prefix + ID`, readable with
//! `redis-cli`, with its TTL on the key.
//!
//! | field | holds |
//! |---|---|
//! | `data` | the session JSON, byte for byte as it was written |
//! | `created` | unix seconds; kept across rotation |
//! | `seen` | unix seconds of the last write or renewal |
//! | `ends` | unix seconds at which the session ends whatever its activity; absent: never |
//! | `ver` | counts the writes of `data`: the version a patch compares before it sets |
//! | `user` | the user `session.user_key` names; absent: none |
//! | `moved` | the new ID, once the session was rotated away to it: this one lives out its grace period |
//!
//! Each change to a session is one Lua script on its key, so it is atomic and sets the TTL
//! in the same step. The scripts never parse JSON: Redis' cjson loses integers above 2^53
//! and turns `[]` into `{}`. A patch is therefore merged in Rust and written back only if
//! `ver` has not moved meanwhile, retried otherwise.
//!
//! With `session.user_key`, a sorted set `key_prefix + "user:" + USER` holds the IDs of the
//! user's sessions, scored by the unix milliseconds at which each expires at the latest,
//! and a string `key_prefix + "handle:" + HANDLE` names the user of each indexed session
//! (the one its last indexing named: an entry in that user's index leads to the ID).
//! Both live in other cluster slots than the session, so separate commands write them,
//! always *before* the session: the index may name sessions that are gone or changed user,
//! never miss one. Reading the index skips the entries that no longer match, and drops
//! only those past their score: an entry whose session is not there, or not the user's,
//! may belong to a write still on its way (the session is indexed first).
//!
//! Index entries expire with their session, not `max_age` after their last write, since a
//! session's end (`ends`) and rotation's grace period cut it short. Creation and rotation
//! index a session for the lifetime it is stored with, renewal for the TTL its script set;
//! a replacement is indexed for `max_age` first (only its script reads `ends`), then cut
//! to the TTL the script reports; a rotated-away ID's entries are cut to its grace period.
//! Cutting comes *after* the session's own TTL was cut, so that, here too, the entries
//! never expire before the session.
//!
//! Connecting never waits for Redis, and no operation waits past the configured timeouts:
//! while Redis is away every operation fails with `StoreError::Unavailable`, and the first
//! one after it is back reconnects. Under Sentinel the store follows failovers and writes
//! are confirmed by a replica (see `SentinelLink`); under Cluster, redirections are
//! followed by the cluster client, and the store answers a ping only while the cluster
//! serves keys (see `cluster_serves`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex as StdMutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::{join_all, try_join, try_join_all};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::io::tcp::TcpSettings;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue,
    IntoConnectionInfo, ParsingError, Pipeline, RedisError, RedisFuture, RedisResult, Script,
    ScriptInvocation, ServerErrorKind, TlsMode, Value,
};
use serde_json::Value as Json;
use tokio::sync::Mutex;

use super::{
    Landed, NewSession, PatchOutcome, REVOKE_PASSES, Record, Rotated, SUCCESSOR_HOPS, SessionInfo,
    Store, StoreError, StoreFuture, StoreSettings, grace_until, secs_up, unix_now,
};
use crate::server::current_worker;
use crate::session::codec::Merged;
use crate::session::id::{IdShape, SessionId};

mod cluster;

/// How often a patch re-merges after losing a race with another write before giving up.
const PATCH_ATTEMPTS: u32 = 200;

/// Sentinel lookups after failed commands are at least this far apart, so that a burst
/// of failures during a failover does not turn into a burst of lookups.
const RESOLVE_INTERVAL: Duration = Duration::from_millis(100);

/// How long the Sentinels' word that a master has no healthy replica is trusted.
const ALONE_FOR: Duration = Duration::from_secs(1);

/// How the proxy reaches Redis.
pub enum Topology {
    /// One server, `redis://` or `rediss://` with user, password and database in the URL.
    Standalone { url: String },
    /// The master that these Sentinels name `master`. The first node's URL also gives the
    /// TLS mode, user, password and database for the master itself.
    Sentinel { master: String, nodes: Vec<String> },
    /// A Redis Cluster, found through any of these nodes.
    Cluster { nodes: Vec<String> },
}

/// Redis settings that do not depend on the topology.
pub struct RedisOptions {
    /// Prepended to every key the store writes (`store.key_prefix`).
    pub key_prefix: String,
    /// How long one attempt to open a connection may take.
    pub connect_timeout: Duration,
    /// How long Redis may take to answer one command.
    pub response_timeout: Duration,
    /// The proxy's worker threads: each gets connections of its own (see `PerWorker`).
    /// 0 when the store is used outside a proxy.
    pub workers: usize,
}

/// The Redis store: sessions in one Redis deployment, shared by every proxy in front of it.
/// Its connections multiplex concurrent operations; share the store itself in an `Arc`.
pub struct RedisStore {
    link: Link,
    keys: Keys,
    settings: StoreSettings,
    /// How long an ID a rotation marked after its grace period (see `SHORTEN`) is kept as
    /// a marker: long enough for the rotation to ask again whether it ran.
    settle: Duration,
    /// Patches and rotations of one session through this store take turns, one stripe
    /// per group of sessions (see `turn`).
    turns: Box<[Mutex<()>]>,
    /// How long a patch or rotation waits for its turn before it goes anyway.
    turn_within: Duration,
    /// Which Redis this is (addresses, no password), for the errors that do not come from
    /// Redis itself: a connection refused, a name that does not resolve, a timeout.
    server: String,
    /// `session.user_key` in quotes, as it stands in a session's JSON that names a user:
    /// looked for before such a session is parsed (see `unindexed_user`).
    quoted_user_key: Option<Vec<u8>>,
}

/// Stripes of `RedisStore::turns`.
const TURNS: usize = 64;

/// The names of the keys the store writes. Session IDs are base64url, without `:`, so a
/// session key never collides with an index key.
struct Keys {
    prefix: String,
}

impl Keys {
    fn session(&self, id: &SessionId) -> String {
        format!("{}{}", self.prefix, id.as_str())
    }

    fn user(&self, user: &str) -> String {
        format!("{}user:{user}", self.prefix)
    }

    fn handle(&self, handle: &str) -> String {
        format!("{}handle:{handle}", self.prefix)
    }
}

/// Why an operation failed, before it is reported as a `StoreError`.
enum Failure {
    Redis(RedisError),
    /// Under Sentinel, no replica acknowledged a write in time.
    Unconfirmed,
    Store(StoreError),
}

impl From<RedisError> for Failure {
    fn from(e: RedisError) -> Self {
        Failure::Redis(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

/// How a conditional write or delete of a session went.
enum Written {
    /// Done; for a delete, the user the session belonged to.
    Done(Option<String>),
    /// Done, to a session rotated away (see `Landed::Moved`); for a delete, the user the
    /// session belonged to.
    Moved(Option<String>),
    /// No session under the key (or, for a delete restricted to a user, not theirs).
    Missing,
    /// `ver` was not the expected one: the session as it is now, to merge into again.
    Changed { data: Vec<u8>, ver: String },
}

/// Scripts answer `1` or `0` when there is nothing more to say, else `{status, a, b}`:
/// `{1, user}`, `{0}` or `{2, data, ver}`; on a session rotated away, `3` or `{3, user}`.
/// (Redis turns a Lua table into a reply more slowly than a number, and most writes have
/// nothing more to say.) `WRITE` adds its TTL, as `{1 or 3, '', ttl}`, when the session's
/// end cut it short of `max_age` (see `WriteAnswer`).
impl FromRedisValue for Written {
    fn from_redis_value(v: Value) -> Result<Written, ParsingError> {
        let (status, a, b) = match v {
            Value::Int(status) => (status, Vec::new(), String::new()),
            v => <(i64, Vec<u8>, String)>::from_redis_value(v)?,
        };
        Ok(match status {
            1 => Written::Done(String::from_utf8(a).ok().filter(|u| !u.is_empty())),
            2 => Written::Changed { data: a, ver: b },
            3 => Written::Moved(String::from_utf8(a).ok().filter(|u| !u.is_empty())),
            _ => Written::Missing,
        })
    }
}

/// What `WRITE` answers: how the write went and, when the session's end cut its TTL short
/// of `max_age`, that TTL, to which its index entries are cut.
struct WriteAnswer {
    written: Written,
    cut: Option<Duration>,
}

impl FromRedisValue for WriteAnswer {
    fn from_redis_value(v: Value) -> Result<WriteAnswer, ParsingError> {
        let cut = match &v {
            Value::Array(items) if matches!(items.first(), Some(Value::Int(1 | 3))) => items
                .get(2)
                .and_then(|ttl| u64::from_redis_value_ref(ttl).ok())
                .map(Duration::from_millis),
            _ => None,
        };
        Ok(WriteAnswer {
            written: Written::from_redis_value(v)?,
            cut,
        })
    }
}

/// `StoreSettings::ttl` in Lua, for the scripts that must cap a TTL by the stored `ends`.
/// Those scripts take `now_ms`, `max_age_ms` and `now_s` as their first three arguments.
macro_rules! with_ttl {
    ($body:literal) => {
        concat!(
            "local function ttl(ends)\n",
            "  local max_age = tonumber(ARGV[2])\n",
            "  local e = tonumber(ends)\n",
            "  if not e then return max_age end\n",
            "  local left = e * 1000 - tonumber(ARGV[1])\n",
            "  if left <= 0 then return nil end\n",
            "  return string.format('%d', math.min(left, max_age))\n",
            "end\n",
            $body
        )
    };
}

/// Reads a session and resets its TTL, touching only `seen`.
/// Answers nil, or `{data, created, user, moved, ttl_ms, ver}`.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(with_ttl!(
        r"
local f = redis.call('HMGET', KEYS[1], 'data', 'created', 'ends', 'user', 'moved', 'ver')
if not f[1] then return false end
local t = ttl(f[3])
if not t then return false end
redis.call('HSET', KEYS[1], 'seen', ARGV[3])
-- A moved ID ends when its grace period does, whatever reads or writes it meanwhile.
if not f[5] then redis.call('PEXPIRE', KEYS[1], t) end
return {f[1], f[2] or '', f[4] or '', f[5] or '', t, f[6] or '0'}
"
    ))
});

/// Names the user of a session whose data names one though the hash does not (it was
/// written while `session.user_key` was not set), unless it was written or moved since
/// it was read at `ver`. ARGV: user, ver.
static ADOPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local f = redis.call('HMGET', KEYS[1], 'created', 'user', 'moved', 'ver')
if not f[1] or f[2] or f[3] or (f[4] or '0') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'user', ARGV[1])
return 1
",
    )
});

/// Stores a new session unless the key is taken.
/// ARGV: pttl, data, created, seen, ends ('' for none), user ('' for none).
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local f = redis.call('HMGET', KEYS[1], 'data', 'created')
if f[1] or f[2] then
  -- Sent again after a dropped connection: this very session is there already.
  if f[1] == ARGV[2] and f[2] == ARGV[3] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'created', ARGV[3], 'seen', ARGV[4], 'ver', 1)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'ends', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'user', ARGV[6]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
",
    )
});

/// Replaces the data of an existing session, if its `ver` is the expected one: three
/// commands (read, write, expire) in the common case, since Redis's CPU per call is
/// most of a write's cost. Only a conflict reads `data`. Answers as `WriteAnswer` reads.
/// ARGV: now_ms, max_age_ms, now_s, data, user ('' for none), ver ('' for any).
static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(with_ttl!(
        r"
local f = redis.call('HMGET', KEYS[1], 'ver', 'ends', 'user', 'created', 'moved')
if not f[4] then return 0 end
local ver = f[1] or '0'
if ARGV[6] ~= '' and ver ~= ARGV[6] then
  return {2, redis.call('HGET', KEYS[1], 'data'), ver}
end
local t = ttl(f[2])
if not t then return 0 end
local bumped = string.format('%d', (tonumber(ver) or 0) + 1)
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'data', ARGV[4], 'seen', ARGV[3], 'ver', bumped, 'user', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'data', ARGV[4], 'seen', ARGV[3], 'ver', bumped)
  if f[3] then redis.call('HDEL', KEYS[1], 'user') end
end
-- A moved ID ends when its grace period does, whatever reads or writes it meanwhile.
if not f[5] then redis.call('PEXPIRE', KEYS[1], t) end
local status = 1
if f[5] then status = 3 end
if tonumber(t) < tonumber(ARGV[2]) then return {status, '', t} end
return status
"
    ))
});

/// Deletes a session, if its `ver` and user are the expected ones.
/// ARGV: ver ('' for any), user ('' for any), 'indexed' to spare a session that names no
/// user.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local f = redis.call('HMGET', KEYS[1], 'ver', 'user', 'data', 'moved')
if not f[3] then return {0, '', ''} end
local ver = f[1] or '0'
if ARGV[1] ~= '' and ver ~= ARGV[1] then return {2, f[3], ver} end
if ARGV[2] ~= '' and f[2] ~= ARGV[2] then return {0, '', ''} end
if ARGV[3] == 'indexed' and not f[2] then return {0, '', ''} end
redis.call('DEL', KEYS[1])
if f[4] then return {3, f[2] or '', ''} end
return {1, f[2] or '', ''}
",
    )
});

/// Whose session a deletion may end.
#[derive(Clone, Copy)]
enum Owner<'a> {
    /// Whoever's, or nobody's.
    Any,
    /// Some user's: a session that names none is spared.
    Anyone,
    /// This user's only.
    User(&'a str),
}

/// Reads what rotation copies. Answers nil, or `{data, created, ends, user, pttl, moved,
/// ver}`.
static PEEK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local f = redis.call('HMGET', KEYS[1], 'data', 'created', 'ends', 'user', 'moved', 'ver')
if not f[1] then return false end
return {f[1], f[2] or '', f[3] or '', f[4] or '', redis.call('PTTL', KEYS[1]), f[5] or '',
  f[6] or '0'}
",
    )
});

/// What `PEEK` answers: data, created, ends, user, pttl, moved, ver.
type Peeked = (Vec<u8>, String, String, String, i64, String, String);

/// Marks a session rotated away and ends it after the grace period (`ends` only shrinks;
/// the TTL becomes the grace period, or what is left of the session if it ends sooner),
/// if it is still at the version its copy was made from and not moved yet.
/// ARGV: grace_end_s, grace_ms, ver, new ID (what `moved` then holds, so that the same
/// rotation sent again after a dropped connection answers done again), now_ms, settle_ms.
/// Answers `{1, readable_until_ms}` (done), 0 (gone), 2 (written since the copy was made)
/// or 3 (moved already, by another rotation).
///
/// Marked when its grace period is already over (none was given, or Redis stalled for
/// longer than it), the old ID is not deleted but left as a marker without data, user or
/// creation time (`moved` and bookkeeping) for `settle_ms`: gone to every other script, yet the
/// rotation, asking again after a lost answer, learns
/// that it ran instead of taking the ID's end for a logout (and dropping the copy, the
/// session with it).
static SHORTEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local f = redis.call('HMGET', KEYS[1], 'created', 'moved', 'ver', 'ends')
if f[2] == ARGV[4] then
  if not f[1] then return {1, 0} end
  return {1, redis.call('PEXPIRETIME', KEYS[1])}
end
if not f[1] then return 0 end
if f[2] then return 3 end
if (f[3] or '0') ~= ARGV[3] then return 2 end
-- Redis's clock, from the key's expiry (without TIME, which needs a permission of its
-- own); before any write, since a script that fails half-way keeps what it wrote.
local left = redis.call('PTTL', KEYS[1])
local now = redis.call('PEXPIRETIME', KEYS[1]) - left
local ends = tonumber(f[4])
if not ends or ends > tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'ends', ARGV[1]) end
redis.call('HSET', KEYS[1], 'moved', ARGV[4])
-- Readable for the whole grace period from the caller's now (the time its index entries
-- get too), unless the session ends first.
local t = tonumber(ARGV[2])
if ends then t = math.min(t, ends * 1000 - tonumber(ARGV[5])) end
local at = tonumber(ARGV[5]) + math.max(t, 0)
if left > 0 and at <= now then
  -- Without `created` too, every other script takes it for gone (a write racing the
  -- rotation cannot bring it back).
  redis.call('HDEL', KEYS[1], 'data', 'user', 'created')
  redis.call('PEXPIREAT', KEYS[1], string.format('%d', now + tonumber(ARGV[6])))
else
  redis.call('PEXPIREAT', KEYS[1], string.format('%d', at))
end
return {1, at}
",
    )
});

/// What `SHORTEN` answers: its status and, when done, until when the old ID is readable
/// (unix ms).
struct Shortened {
    status: i64,
    expires_at: Option<u64>,
}

impl FromRedisValue for Shortened {
    fn from_redis_value(v: Value) -> Result<Shortened, ParsingError> {
        Ok(match v {
            Value::Int(status) => Shortened {
                status,
                expires_at: None,
            },
            v => {
                let (status, at) = <(i64, i64)>::from_redis_value(v)?;
                Shortened {
                    status,
                    expires_at: u64::try_from(at).ok(),
                }
            }
        })
    }
}

/// Adds a session to a user's index or moves its expiry later (`GT`), or moves the expiry
/// of an indexed session earlier (`LT`) or to exactly this (`EQ`); drops the entries past
/// their expiry, and lets the index itself expire with its last entry. ARGV: id,
/// expires_ms, now_ms, `GT`, `LT` or `EQ`.
static INDEX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[4] == 'LT' then
  redis.call('ZADD', KEYS[1], 'XX', 'LT', ARGV[2], ARGV[1])
elseif ARGV[4] == 'EQ' then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[1], string.format('%d', tonumber(last[2]))) end
return 1
",
    )
});

/// Names a session's user under its handle, until `until_ms` or later if it was to last
/// longer (a rotated-away ID keeps its whole grace period, whatever is written through
/// it). ARGV: user, until_ms.
static HANDLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local at = tonumber(ARGV[2])
local was = redis.call('PEXPIRETIME', KEYS[1])
if was > at then at = was end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', string.format('%d', at))
return 1
",
    )
});

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// An ID read back from the user index. Members were written by the proxy; one of any
/// other shape is treated as a stale entry.
fn stored_id(member: &str) -> Option<SessionId> {
    IdShape::new(member.len() * 3 / 4)?.parse(member)
}

/// What a failure reports: what Redis answered, or why the connection failed, and for
/// the usual mistakes in the settings what to check. `prefix` is `store.key_prefix`, for
/// the keys an ACL must allow. Never keys or values, which would carry session IDs and
/// data (see `redact`); no error carries the password.
fn describe(e: &RedisError, prefix: &str) -> String {
    if e.is_timeout() {
        return "Redis did not answer in time".into();
    }
    if e.is_connection_refusal() {
        return "Redis refused the connection".into();
    }
    match (e.kind(), e.code()) {
        (ErrorKind::AuthenticationFailed, _) => {
            "Redis refused the user name or password: check those in the URL".into()
        }
        (ErrorKind::Io, _) => match tls_error(e).and_then(certificate_hint) {
            Some(hint) => format!("Redis connection failed: {e}; {hint}"),
            None => format!("Redis connection failed: {e}"),
        },
        (_, Some(code)) => {
            let detail = e.detail().map(redact).unwrap_or_default();
            let answer = format!("Redis answered {code} {detail}");
            match server_hint(code, &detail, prefix) {
                Some(hint) => format!("{}; {hint}", answer.trim_end()),
                None => answer.trim_end().to_string(),
            }
        }
        // The library's own errors: their details may quote a reply, which may hold data.
        (_, None) => format!("Redis connection failed: {}", e.category()),
    }
}

/// What to check when Redis answers `code` to the store's commands.
fn server_hint(code: &str, detail: &str, prefix: &str) -> Option<String> {
    let hint = match code {
        "NOPERM" => format!(
            "the Redis user's ACL must allow the keys ~{prefix}* and the commands the store \
             runs (+@read +@write +@scripting +ping; +cluster|info +cluster|nodes +wait under \
             Cluster, +wait under Sentinel)"
        ),
        "NOAUTH" => "Redis requires a password: give it in the URL \
                     (redis://user:password@host:port)"
            .into(),
        "WRONGPASS" => "check the user name and password in the URL".into(),
        "READONLY" => "the URL names a replica: name the master, or use store.sentinel".into(),
        "MOVED" | "ASK" => "the URL names a Redis Cluster node: use store.cluster".into(),
        _ if detail.contains("DB index is out of range") => "the database in the URL \
             (redis://host:port/DB) must be below the server's `databases` setting \
             (16 by default)"
            .into(),
        _ if detail.contains("SELECT is not allowed in cluster mode") => {
            "a Redis Cluster has only database 0: remove /DB from the node URLs".into()
        }
        _ => return None,
    };
    Some(hint)
}

/// The TLS error behind an I/O failure, if that is what it was.
fn tls_error(e: &RedisError) -> Option<&rustls::Error> {
    let source = std::error::Error::source(e)?;
    // redis-rs keeps the I/O error in an `Arc`, which is what `source` hands out.
    let io = match source.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
        Some(shared) => shared.downcast_ref::<std::io::Error>()?,
        None => source.downcast_ref::<std::io::Error>()?,
    };
    io.get_ref()?.downcast_ref()
}

/// What to check when Redis's certificate was refused.
fn certificate_hint(e: &rustls::Error) -> Option<&'static str> {
    use rustls::CertificateError as Refused;
    let rustls::Error::InvalidCertificate(refused) = e else {
        return None;
    };
    Some(match refused {
        // A bad signature: a trusted CA has the issuer's name, but did not sign it.
        Refused::UnknownIssuer | Refused::BadSignature => {
            "Redis's certificate is not signed by a CA the proxy trusts: rediss:// \
             certificates are checked against the system's CA certificates, or the file \
             SSL_CERT_FILE names, which must then hold the CA that signed it"
        }
        Refused::NotValidForName | Refused::NotValidForNameContext { .. } => {
            "Redis's certificate does not name the host in the URL: connect by a name (or IP \
             address) the certificate lists"
        }
        Refused::Expired
        | Refused::ExpiredContext { .. }
        | Refused::NotValidYet
        | Refused::NotValidYetContext { .. } => {
            "Redis's certificate is outside its validity period (check its dates and the clock)"
        }
        _ => "Redis's certificate was refused",
    })
}

/// Shortest run of ID characters that is taken for a session ID (16 bytes in base64url).
const ID_LIKE: usize = 22;

/// A server's error detail without what could carry a session ID or session data. Redis
/// quotes the arguments of a command it does not know (", with args beginning with: …"),
/// which are dropped, and may quote the key an ACL refused: a quoted word that could be
/// one of the store's keys (with a `:`, or long) becomes `'…'`, as does any unquoted run
/// of base64url characters as long as a session ID.
fn redact(detail: &str) -> String {
    let detail = detail
        .split(", with args beginning with")
        .next()
        .unwrap_or(detail);
    let mut out = String::with_capacity(detail.len());
    // Every other piece between quotes is quoted.
    for (i, piece) in detail.split('\'').enumerate() {
        if i % 2 == 1 {
            let keyish = piece.contains(':') || piece.chars().count() >= ID_LIKE;
            out.push('\'');
            out.push_str(if keyish { "…" } else { piece });
            out.push('\'');
            continue;
        }
        let mut run = String::new();
        for c in piece.chars().chain([' ']) {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                run.push(c);
                continue;
            }
            out.push_str(if run.len() >= ID_LIKE { "…" } else { &run });
            run.clear();
            out.push(c);
        }
        out.pop();
    }
    out
}

fn invalid_url(what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "{what} is not a valid Redis URL (redis://[user:password@]host:port[/db] or rediss://…)"
    ))
}

/// TCP_NODELAY: a session command is a few small packets that should not wait for more.
fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

fn parse_url(url: &str, what: &str) -> Result<ConnectionInfo, StoreError> {
    let info = url.into_connection_info().map_err(|_| invalid_url(what))?;
    Ok(info.set_tcp_settings(tcp_settings()))
}

fn manager_config(options: &RedisOptions) -> ConnectionManagerConfig {
    // No retries inside the manager: an operation fails fast while Redis is down, and the
    // next one starts a new connection attempt, so recovery follows Redis within one call.
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.response_timeout))
        .set_number_of_retries(0)
}

/// Which Redis a topology names, by address only (its URLs may carry passwords).
fn server_of(topology: &Topology) -> String {
    let addresses = |urls: &[String]| {
        urls.iter()
            .filter_map(|url| redis::IntoConnectionInfo::into_connection_info(url.as_str()).ok())
            .map(|info| info.addr().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match topology {
        Topology::Standalone { url } => {
            format!("Redis at {}", addresses(std::slice::from_ref(url)))
        }
        Topology::Sentinel { master, nodes } => {
            format!(
                "Redis master `{master}` through the Sentinels at {}",
                addresses(nodes)
            )
        }
        Topology::Cluster { nodes } => format!("Redis Cluster at {}", addresses(nodes)),
    }
}

fn standalone(
    url: &str,
    options: &RedisOptions,
) -> Result<PerWorker<ConnectionManager>, StoreError> {
    let client =
        Client::open(parse_url(url, "store.url")?).map_err(|_| invalid_url("store.url"))?;
    let config = manager_config(options);
    PerWorker::new(options.workers, move || {
        ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
    })
    .map_err(|e| StoreError::Unavailable(describe(&e, &options.key_prefix)))
}

fn cluster(
    nodes: &[String],
    options: &RedisOptions,
) -> Result<PerWorker<ClusterConnection>, StoreError> {
    let infos = nodes
        .iter()
        .enumerate()
        .map(|(i, url)| parse_url(url, &format!("store.cluster.nodes[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let client = ClusterClient::builder(infos)
        .tcp_settings(tcp_settings())
        .connection_timeout(options.connect_timeout)
        .response_timeout(options.response_timeout)
        // Room for a redirection or a reconnection within one operation.
        .overall_response_timeout(Some(options.connect_timeout + options.response_timeout * 2))
        .build()
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "store.cluster: {}",
                describe(&e, &options.key_prefix)
            ))
        })?;
    let config = ClusterConfig::new()
        .set_connection_timeout(options.connect_timeout)
        .set_response_timeout(options.response_timeout);
    PerWorker::new(options.workers, move || {
        Ok(client.get_pending_async_connection_with_config(config.clone()))
    })
    .map_err(|e| {
        StoreError::Unavailable(format!(
            "store.cluster: {}",
            describe(&e, &options.key_prefix)
        ))
    })
}

/// What a Cluster operation that ran out of time reports. The cluster client retries a
/// node that cannot be reached or answers CLUSTERDOWN until the overall timeout, so the
/// timeout is all that is left of those errors: a cluster that is down (every node
/// answering CLUSTERDOWN at once) fails like a node that does not answer.
const CLUSTER_TIMEOUT: &str = "Redis Cluster did not complete the command within \
    store.connect_timeout + 2 × store.response_timeout: a node did not answer, could not be \
    reached, or answered CLUSTERDOWN until then (/readyz says whether the cluster is down)";

/// How a connection of a `PerWorker` is opened.
type Opener<T> = Box<dyn Fn() -> RedisResult<T> + Send + Sync>;

/// A connection per worker thread, and one shared by everything else (the admin port,
/// the CLI). A worker's connection is opened from that thread on its first use: its
/// tasks run on the runtime it is opened on, so its I/O is done by the thread whose
/// requests use it and a reply wakes no other thread.
struct PerWorker<T> {
    shared: Renewable<T>,
    local: Box<[OnceLock<Renewable<T>>]>,
    open: Opener<T>,
}

/// One of a `PerWorker`'s connections, and when it was opened. Only the thread it belongs
/// to takes its lock (the shared one's: whoever runs outside the workers), so the lock is
/// not contended.
struct Renewable<T>(StdMutex<(T, Instant)>);

impl<T: Clone> Renewable<T> {
    fn new(conn: T) -> Renewable<T> {
        Renewable(StdMutex::new((conn, Instant::now())))
    }

    fn get(&self) -> T {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }
}

impl<T: Clone> PerWorker<T> {
    fn new(
        workers: usize,
        open: impl Fn() -> RedisResult<T> + Send + Sync + 'static,
    ) -> RedisResult<PerWorker<T>> {
        Ok(PerWorker {
            shared: Renewable::new(open()?),
            local: (0..workers).map(|_| OnceLock::new()).collect(),
            open: Box::new(open),
        })
    }

    /// The connection for the thread this runs on, opened on its first use.
    fn slot(&self) -> &Renewable<T> {
        let Some(cell) = current_worker().and_then(|w| self.local.get(w)) else {
            return &self.shared;
        };
        if let Some(slot) = cell.get() {
            return slot;
        }
        match (self.open)() {
            Ok(conn) => cell.get_or_init(|| Renewable::new(conn)),
            // The same settings opened the shared connection, so this does not happen.
            Err(_) => &self.shared,
        }
    }

    fn get(&self) -> T {
        self.slot().get()
    }

    /// Replaces the connection of the thread this runs on with a new one, unless it is
    /// younger than `min_age`: after a timeout, many operations fail at once, and one new
    /// connection is enough for all of them.
    fn renew(&self, min_age: Duration) {
        let slot = self.slot();
        let mut current = slot.0.lock().unwrap_or_else(PoisonError::into_inner);
        if current.1.elapsed() < min_age {
            return;
        }
        if let Ok(conn) = (self.open)() {
            *current = (conn, Instant::now());
        }
    }
}

/// The way to Redis for one topology.
enum Link {
    Standalone(PerWorker<ConnectionManager>),
    Sentinel(Arc<SentinelLink>),
    Cluster {
        conns: PerWorker<ClusterConnection>,
        /// How old a connection must be before a timeout replaces it (see `recover`).
        renew_after: Duration,
        /// How many replicas each write waits for (see `cluster`).
        replicas: cluster::ClusterReplicas,
    },
}

impl Link {
    async fn conn(&self) -> RedisResult<Conn> {
        match self {
            Link::Standalone(conns) => Ok(Conn::Node(conns.get())),
            Link::Sentinel(link) => link.conn().await.map(Conn::Master),
            Link::Cluster { conns, .. } => Ok(Conn::Cluster(conns.get())),
        }
    }

    /// After a failed command: under Sentinel the master may have moved. Under Cluster,
    /// a command that timed out may have gone to a master that stopped answering without
    /// closing its connections (a paused process, a network partition): the cluster
    /// client follows a failover only when a node says the slot has `MOVED`, which such
    /// a master never does, so this thread's connection is replaced by one that learns
    /// the slots afresh.
    async fn recover(&self, failure: Option<&RedisError>) {
        match self {
            Link::Sentinel(link) => link.recover().await,
            Link::Cluster {
                conns, renew_after, ..
            } if failure.is_some_and(RedisError::is_timeout) => {
                conns.renew(*renew_after);
            }
            _ => {}
        }
    }
}

/// A connection to the node (or, for a cluster, the nodes) a command goes to.
///
/// A command to a standalone server or a Sentinel master whose connection was refused or
/// had dropped goes once more, on the new connection the failure started:
/// - a refusal: the command never left. Each connection keeps the outcome of its last
///   attempt, so without this the first command on each of them after Redis comes back
///   would fail with the refusal cached from while it was away;
/// - a dropped connection (Redis closed it: its `timeout` for idle clients, a restart):
///   usually the command never left either. When it did and ran, running it again is
///   harmless: every operation is a read, a delete, or a script that checks what it
///   finds (a version, an existing key) before it writes.
///
/// A timeout is not retried: the command may still be running.
#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    /// The master the Sentinels named when the operation started.
    Master(Master),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(conn) | Conn::Master(Master { conn, .. }) => Box::pin(async move {
                match conn.send_packed_command(cmd).await {
                    Err(e) if worth_retrying(&e) => conn.send_packed_command(cmd).await,
                    reply => reply,
                }
            }),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(conn) | Conn::Master(Master { conn, .. }) => Box::pin(async move {
                match conn.send_packed_commands(pipeline, offset, count).await {
                    Err(e) if worth_retrying(&e) => {
                        conn.send_packed_commands(pipeline, offset, count).await
                    }
                    reply => reply,
                }
            }),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(conn) | Conn::Master(Master { conn, .. }) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A refused or dropped connection, not a timeout (see [`Conn`]).
fn worth_retrying(e: &RedisError) -> bool {
    (e.is_connection_refusal() || e.is_connection_dropped()) && !e.is_timeout()
}

/// The connection to the master a set of Sentinels names, following failovers.
///
/// A `ConnectionManager` reconnects to the address it was made with and never learns that
/// the Sentinels promoted another server. So after a failed command, and when the
/// Sentinels announce a new master (`follow_failovers`), the master is looked up again,
/// and when it has moved the connections are replaced.
///
/// Writes are acknowledged only once every replica the Sentinels know as healthy holds
/// them (`WAIT n`): the Sentinels may promote any of them, and a write only one replica
/// confirmed is lost when another is promoted and the first is re-synced from it. During
/// a failover the old master goes on accepting writes for seconds after a replica was
/// promoted, and drops them when it is turned into a replica; `WAIT` finds too few
/// replicas for those, and the Sentinels then say a failover is under way or name another
/// master, so they fail instead of being lost. A master may also legitimately have no
/// healthy replica, right after a failover or while its replicas are down: then nothing
/// could be promoted over it and nothing lost, so its writes are accepted without one. What
/// the Sentinels say is kept for `ALONE_FOR`, and asked again before a write after that,
/// so that a replica they marked down no longer holds every write up.
struct SentinelLink {
    service: String,
    /// How to connect to the master once found.
    node: SentinelNodeConnectionInfo,
    config: ConnectionManagerConfig,
    /// The Sentinels, for the one question `Sentinel` has no method for.
    sentinels: Vec<Client>,
    sentinel_config: AsyncConnectionConfig,
    /// Upper bound for one lookup through the Sentinels.
    lookup_timeout: Duration,
    /// How long a write waits for a replica.
    confirm_within: Duration,
    /// Held during a lookup, so that only one runs at a time.
    resolver: Mutex<Resolver>,
    master: RwLock<Option<Master>>,
    /// Each worker thread's own connection to the master, opened from that thread (see
    /// `PerWorker`), replaced when the master moves.
    local: Box<[StdMutex<Option<Master>>]>,
    /// What the Sentinels last said of a master's replicas, and until when it holds.
    replicas: StdMutex<Option<(Arc<ConnectionAddr>, Replicas, Instant)>>,
    /// Set while one write asks the Sentinels: the others go on with what was said last.
    asking: AtomicBool,
}

/// Clears a flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// How many replicas must confirm a write to a master, as the Sentinels see it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Replicas {
    /// Every healthy replica (0: it is alone).
    Want(u64),
    /// A failover is under way, or the Sentinels name another master: nothing written to
    /// this one can be relied on.
    Refuse,
}

/// Finds the master through the Sentinels, and remembers when it last did.
struct Resolver {
    sentinel: Sentinel,
    last: Option<Instant>,
}

/// The master as last found, and a connection to it.
#[derive(Clone)]
struct Master {
    addr: Arc<ConnectionAddr>,
    client: Arc<Client>,
    conn: ConnectionManager,
}

/// One replica as `SENTINEL REPLICAS` describes it.
type ReplicaInfo = HashMap<String, String>;

impl SentinelLink {
    fn new(service: String, nodes: &[String], options: &RedisOptions) -> Result<Self, StoreError> {
        let mut infos = nodes
            .iter()
            .enumerate()
            .map(|(i, url)| parse_url(url, &format!("store.sentinel.nodes[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = infos.first() else {
            return Err(StoreError::Unavailable(
                "store.sentinel.nodes is empty".into(),
            ));
        };
        let mut node = SentinelNodeConnectionInfo::default()
            .set_tcp_settings(tcp_settings())
            .set_redis_connection_info(first.redis_settings().clone());
        if let ConnectionAddr::TcpTls { insecure, .. } = first.addr() {
            node = node.set_tls_mode(if *insecure {
                TlsMode::Insecure
            } else {
                TlsMode::Secure
            });
        }
        // The database in the URL is the master's: Sentinels have none to SELECT.
        for info in &mut infos {
            let redis = info.redis_settings().clone().set_db(0);
            *info = info.clone().set_redis_settings(redis);
        }
        let sentinels = infos
            .iter()
            .map(|info| Client::open(info.clone()))
            .collect::<RedisResult<Vec<_>>>()
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "store.sentinel: {}",
                    describe(&e, &options.key_prefix)
                ))
            })?;
        let sentinel = Sentinel::build(infos).map_err(|e| {
            StoreError::Unavailable(format!(
                "store.sentinel: {}",
                describe(&e, &options.key_prefix)
            ))
        })?;
        Ok(SentinelLink {
            service,
            node,
            config: manager_config(options),
            sentinels,
            sentinel_config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(options.connect_timeout))
                .set_response_timeout(Some(options.response_timeout)),
            lookup_timeout: options.connect_timeout * 2 + options.response_timeout * 2,
            // Well inside the response timeout, which bounds the WAIT command itself.
            confirm_within: options.response_timeout / 2,
            resolver: Mutex::new(Resolver {
                sentinel,
                last: None,
            }),
            master: RwLock::new(None),
            local: (0..options.workers).map(|_| StdMutex::default()).collect(),
            replicas: StdMutex::new(None),
            asking: AtomicBool::new(false),
        })
    }

    fn current(&self) -> Option<Master> {
        self.master
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn conn(&self) -> RedisResult<Master> {
        let master = match self.current() {
            Some(master) => master,
            None => {
                let mut resolver = self.resolver.lock().await;
                // Another caller may have found the master while this one waited.
                match self.current() {
                    Some(master) => master,
                    None => self.resolve(&mut resolver).await?,
                }
            }
        };
        Ok(self.on_this_thread(master))
    }

    /// This worker thread's connection to `master`, opened on first use.
    fn on_this_thread(&self, master: Master) -> Master {
        let Some(slot) = current_worker().and_then(|w| self.local.get(w)) else {
            return master;
        };
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(mine) = slot.as_ref().filter(|m| Arc::ptr_eq(&m.addr, &master.addr)) {
            return mine.clone();
        }
        let Ok(conn) = ConnectionManager::new_lazy_with_config(
            Client::clone(&master.client),
            self.config.clone(),
        ) else {
            // The same settings opened the shared connection, so this does not happen.
            return master;
        };
        let mine = Master { conn, ..master };
        *slot = Some(mine.clone());
        mine
    }

    async fn recover(&self) {
        // A lookup already running will see the same state this one would.
        let Ok(mut resolver) = self.resolver.try_lock() else {
            return;
        };
        if resolver
            .last
            .is_some_and(|t| t.elapsed() < RESOLVE_INTERVAL)
        {
            return;
        }
        // On failure the current connection stays: the next failed command tries again.
        let _ = self.resolve(&mut resolver).await;
    }

    /// After the Sentinels announced a new master for this service.
    async fn switched(&self) {
        let mut resolver = self.resolver.lock().await;
        // On failure the current connection stays: the next failed command tries again.
        let _ = self.resolve(&mut resolver).await;
    }

    async fn resolve(&self, resolver: &mut Resolver) -> RedisResult<Master> {
        resolver.last = Some(Instant::now());
        let lookup = resolver
            .sentinel
            .async_master_for(&self.service, Some(&self.node));
        let client = tokio::time::timeout(self.lookup_timeout, lookup)
            .await
            .map_err(|_| timed_out())??;
        let addr = client.get_connection_info().addr().clone();
        let mut master = self.master.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(same) = master.as_ref().filter(|m| *m.addr == addr) {
            // Same master: its manager reconnects by itself.
            return Ok(same.clone());
        }
        let found = Master {
            addr: Arc::new(addr),
            conn: ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())?,
            client: Arc::new(client),
        };
        *master = Some(found.clone());
        Ok(found)
    }

    /// Whether writes to `master` currently go without a replica's acknowledgement.
    /// How many replicas must confirm a write to `master`: what the Sentinels said within
    /// `ALONE_FOR`, else asked now (`fresh`: asked now in any case). When no Sentinel
    /// answers, what they said last holds, or one replica if they never said.
    async fn replicas_for(&self, master: &Arc<ConnectionAddr>, fresh: bool) -> Replicas {
        let known = {
            let cached = self.replicas.lock().unwrap_or_else(PoisonError::into_inner);
            cached
                .as_ref()
                .filter(|(addr, _, _)| **addr == **master)
                .map(|(_, replicas, until)| (*replicas, Instant::now() < *until))
        };
        if let Some((replicas, true)) = known
            && !fresh
        {
            return replicas;
        }
        // What an expired answer still allows: never less than one replica, and a refusal
        // stands.
        let cautious = match known {
            Some((Replicas::Want(n), _)) => Replicas::Want(n.max(1)),
            Some((Replicas::Refuse, _)) => Replicas::Refuse,
            None => Replicas::Want(1),
        };
        // One write asks at a time; the others go on with the cautious answer meanwhile.
        if self
            .asking
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return cautious;
        }
        // Cleared however this ends, even if the write that asks is dropped on the way.
        let _asked = ClearOnDrop(&self.asking);
        // Without a majority of the Sentinels to ask, the cautious answer holds as long as
        // an answer would: writes do not each ask again.
        let replicas = self.ask_all(master).await.unwrap_or(cautious);
        let mut cached = self.replicas.lock().unwrap_or_else(PoisonError::into_inner);
        *cached = Some((master.clone(), replicas, Instant::now() + ALONE_FOR));
        replicas
    }

    /// Asks every Sentinel at once how many replicas must confirm a write to `master`,
    /// and takes the most cautious answer: a refusal when any of them reports the master
    /// down by agreement (`o_down`: a failover is about to start) or a failover under way,
    /// or when fewer than a majority of them name `master`; else the most healthy replicas
    /// any of them counts. `None` when fewer than a majority answer: a Sentinel alone with
    /// the master on its side of a partition may see no replica at all while the others
    /// promote one.
    async fn ask_all(&self, master: &Arc<ConnectionAddr>) -> Option<Replicas> {
        let (ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. }) =
            &**master
        else {
            return Some(Replicas::Want(1));
        };
        // Sentinels answer this in a millisecond: one that takes longer than a write may
        // wait for a replica counts as out of reach.
        let answers = join_all(self.sentinels.iter().map(|sentinel| async move {
            tokio::time::timeout(self.confirm_within, self.ask(sentinel))
                .await
                .ok()
                .and_then(Result::ok)
        }))
        .await;
        let majority = self.sentinels.len() / 2 + 1;
        let answers: Vec<_> = answers.into_iter().flatten().collect();
        if answers.len() < majority {
            return None;
        }
        let flags = |info: &ReplicaInfo| {
            info.get("flags")
                .map(|f| f.split(',').map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let mut naming = 0;
        let mut wanted = 0;
        for (named, replicas, state) in &answers {
            let troubled = flags(state)
                .iter()
                .any(|f| f.starts_with("failover") || ["promoted", "o_down"].contains(&f.as_str()))
                || replicas
                    .iter()
                    .any(|r| flags(r).iter().any(|f| f == "promoted"));
            if troubled {
                return Some(Replicas::Refuse);
            }
            if named.as_ref().is_some_and(|(h, p)| h == host && p == port) {
                naming += 1;
            }
            let healthy = replicas.iter().filter(|r| replica_is_healthy(r)).count();
            wanted = wanted.max(healthy as u64);
        }
        if naming < majority {
            return Some(Replicas::Refuse);
        }
        Some(Replicas::Want(wanted))
    }

    /// The master a Sentinel names, its replicas, and its own state (`flags` tells of a
    /// failover under way).
    async fn ask(
        &self,
        sentinel: &Client,
    ) -> RedisResult<(Option<(String, u16)>, Vec<ReplicaInfo>, ReplicaInfo)> {
        let mut conn = sentinel
            .get_multiplexed_async_connection_with_config(&self.sentinel_config)
            .await?;
        redis::pipe()
            .cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.service)
            .cmd("SENTINEL")
            .arg("REPLICAS")
            .arg(&self.service)
            .cmd("SENTINEL")
            .arg("MASTER")
            .arg(&self.service)
            .query_async(&mut conn)
            .await
    }
}

/// How often a subscriber with nothing to read checks that its store still exists, and
/// how long it waits before subscribing again after losing its Sentinel.
const SUBSCRIBER_CHECK: Duration = Duration::from_secs(5);
const SUBSCRIBER_RETRY: Duration = Duration::from_secs(1);

/// Listens to the Sentinels' `+switch-master` announcements, one Sentinel at a time, and
/// looks the master up again as soon as this service's master has moved. Without it the
/// store learns of a failover only from a failing command: writes fail on a demoted
/// master, but reads do not (it is a replica now and answers them), so a stretch of
/// reads alone would stay on it. Ends once the link is dropped.
async fn follow_failovers(link: Weak<SentinelLink>) {
    let mut turn = 0;
    loop {
        let Some((sentinel, service, within)) = link.upgrade().and_then(|l| {
            let sentinel = l.sentinels.get(turn % l.sentinels.len().max(1))?.clone();
            Some((sentinel, l.service.clone(), l.lookup_timeout))
        }) else {
            return;
        };
        turn += 1;
        let subscribed = tokio::time::timeout(within, async {
            let mut pubsub = sentinel.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            RedisResult::Ok(pubsub)
        })
        .await;
        if let Ok(Ok(pubsub)) = subscribed {
            let mut announcements = pubsub.into_on_message();
            loop {
                let next = tokio::time::timeout(SUBSCRIBER_CHECK, announcements.next()).await;
                let Some(link) = link.upgrade() else { return };
                match next {
                    Err(_) => continue,
                    // The Sentinel went away: subscribe at the next one.
                    Ok(None) => break,
                    Ok(Some(message)) => {
                        // "<service> <old ip> <old port> <new ip> <new port>"
                        let payload: String = message.get_payload().unwrap_or_default();
                        if payload.split(' ').next() == Some(service.as_str()) {
                            link.switched().await;
                        }
                    }
                }
            }
        }
        if link.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(SUBSCRIBER_RETRY).await;
    }
}

/// A replica the Sentinels could promote: reachable and in sync with its master.
fn replica_is_healthy(replica: &ReplicaInfo) -> bool {
    let flags = replica.get("flags").map(String::as_str).unwrap_or("");
    let down = ["s_down", "o_down", "disconnected"]
        .iter()
        .any(|flag| flags.split(',').any(|f| f == *flag));
    !down && replica.get("master-link-status").map(String::as_str) == Some("ok")
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

impl RedisStore {
    /// Prepares the connections for `topology`. Fails only on invalid settings; Redis
    /// itself is first contacted by the first operation.
    pub async fn connect(
        topology: Topology,
        options: RedisOptions,
        settings: StoreSettings,
    ) -> Result<RedisStore, StoreError> {
        let server = server_of(&topology);
        let quoted_user_key = settings
            .user_key
            .as_deref()
            .map(|key| format!("\"{key}\"").into_bytes());
        let link = match topology {
            Topology::Standalone { url } => Link::Standalone(standalone(&url, &options)?),
            Topology::Sentinel { master, nodes } => {
                let link = Arc::new(SentinelLink::new(master, &nodes, &options)?);
                tokio::spawn(follow_failovers(Arc::downgrade(&link)));
                Link::Sentinel(link)
            }
            Topology::Cluster { nodes } => {
                Link::Cluster {
                    conns: cluster(&nodes, &options)?,
                    renew_after: options.response_timeout,
                    // Well inside the response timeout, which bounds `WAIT` itself.
                    replicas: cluster::ClusterReplicas::new(options.response_timeout / 2),
                }
            }
        };
        Ok(RedisStore {
            link,
            keys: Keys {
                prefix: options.key_prefix,
            },
            settings,
            settle: options.response_timeout * 3 + Duration::from_secs(1),
            turns: (0..TURNS).map(|_| Mutex::new(())).collect(),
            turn_within: options.response_timeout,
            server,
            quoted_user_key,
        })
    }

    /// Runs one operation and reports its failure.
    async fn run<T>(&self, op: impl Future<Output = Result<T, Failure>>) -> Result<T, StoreError> {
        match op.await {
            Ok(value) => Ok(value),
            Err(Failure::Store(e)) => Err(e),
            Err(Failure::Redis(e)) => {
                self.link.recover(Some(&e)).await;
                let why = match self.link {
                    Link::Cluster { .. } if e.is_timeout() => CLUSTER_TIMEOUT.into(),
                    _ => describe(&e, &self.keys.prefix),
                };
                // An answer from Redis names its own trouble; anything else says where.
                let why = match e.code() {
                    Some(_) => why,
                    None => format!("{why} ({})", self.server),
                };
                Err(StoreError::Unavailable(why))
            }
            Err(Failure::Unconfirmed) => {
                self.link.recover(None).await;
                Err(StoreError::Unavailable(
                    "no Redis replica acknowledged the write in time".into(),
                ))
            }
        }
    }

    /// Runs a script that changes the session under `key`. Under Sentinel and Cluster it
    /// succeeds only once the replicas hold the change (see `SentinelLink` and `cluster`);
    /// the `WAIT` goes in one pipeline with the script, so that it runs on the same
    /// connection, after it.
    async fn commit<T: FromRedisValue>(
        &self,
        conn: &mut Conn,
        key: &str,
        call: &ScriptInvocation<'_>,
    ) -> Result<T, Failure> {
        let wanted = self.replicas_wanted(conn, key, false).await?;
        let Some(within) = wanted.filter(|n| *n > 0).and(self.confirm_within()) else {
            return Ok(call.invoke_async(conn).await?);
        };
        let wanted = wanted.unwrap_or_default();
        let mut pipe = redis::pipe();
        pipe.invoke_script(call)
            .cmd("WAIT")
            .arg(wanted)
            .arg(millis(within));
        let (value, confirmed): (T, u64) = match pipe.query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                call.load_async(conn).await?;
                pipe.query_async(conn).await?
            }
            reply => reply?,
        };
        if confirmed < wanted {
            // Fewer than expected: a replica went down (then the Sentinels or the cluster
            // know fewer healthy ones by now), or a failover is under way (then nothing
            // stands).
            match self.replicas_wanted(conn, key, true).await {
                Ok(Some(n)) if n <= confirmed => {}
                _ => return Err(Failure::Unconfirmed),
            }
        }
        Ok(value)
    }

    /// How many replicas must confirm a write to `key`: to the master of its slot (under
    /// Cluster) or to the master (under Sentinel), asked again when `fresh`; `None` where
    /// writes do not wait (standalone). A refusal of the Sentinels is `Unconfirmed`.
    async fn replicas_wanted(
        &self,
        conn: &mut Conn,
        key: &str,
        fresh: bool,
    ) -> Result<Option<u64>, Failure> {
        match (&self.link, conn) {
            (Link::Sentinel(link), Conn::Master(master)) => {
                match link.replicas_for(&master.addr, fresh).await {
                    Replicas::Refuse => Err(Failure::Unconfirmed),
                    Replicas::Want(n) => Ok(Some(n)),
                }
            }
            (Link::Cluster { replicas, .. }, Conn::Cluster(cluster)) => {
                let slot = cluster::key_slot(key.as_bytes());
                Ok(Some(replicas.wanted(cluster, slot, fresh).await?))
            }
            _ => Ok(None),
        }
    }

    /// How long a write waits for its replicas, where it does.
    fn confirm_within(&self) -> Option<Duration> {
        match &self.link {
            Link::Sentinel(link) => Some(link.confirm_within),
            Link::Cluster { replicas, .. } => Some(replicas.confirm_within),
            Link::Standalone(_) => None,
        }
    }

    /// Indexes a session under its user until `until` (unix time), by which it expires at
    /// the latest, before the session itself is written.
    async fn index(
        &self,
        conn: &Conn,
        user: &str,
        id: &SessionId,
        until: Duration,
        now: Duration,
    ) -> Result<(), Failure> {
        let call = self.index_call(user, id, until, now, "GT");
        let mut handle = HANDLE.key(self.keys.handle(&id.handle()));
        handle.arg(user).arg(millis(until));
        let (mut by_user, mut by_handle) = (conn.clone(), conn.clone());
        try_join(
            call.invoke_async::<()>(&mut by_user),
            handle.invoke_async::<()>(&mut by_handle),
        )
        .await?;
        Ok(())
    }

    /// Moves a session's index entries to expire at `until` (unix time): earlier only
    /// (`LT`, after the session was cut short by its end), later only (`GT`, before a
    /// rotation gives the old ID its grace period), or to exactly that (`EQ`, once it has).
    /// Best effort: an entry left longer only outlives its session, and reading the index
    /// drops it.
    async fn end_index_at(
        &self,
        conn: &Conn,
        (user, id): (&str, &SessionId),
        until: Duration,
        now: Duration,
        only: &'static str,
    ) {
        let call = self.index_call(user, id, until, now, only);
        let mut handle = redis::cmd("PEXPIREAT");
        handle
            .arg(self.keys.handle(&id.handle()))
            .arg(millis(until));
        if only != "EQ" {
            handle.arg(only);
        }
        let (mut by_user, mut by_handle) = (conn.clone(), conn.clone());
        let _ = try_join(
            call.invoke_async::<()>(&mut by_user),
            handle.query_async::<()>(&mut by_handle),
        )
        .await;
    }

    /// The `INDEX` call that moves a session's expiry in its user's index to `until`,
    /// later only (`GT`) or earlier only (`LT`).
    fn index_call(
        &self,
        user: &str,
        id: &SessionId,
        until: Duration,
        now: Duration,
        only: &str,
    ) -> ScriptInvocation<'static> {
        let mut call = INDEX.key(self.keys.user(user));
        call.arg(id.as_str())
            .arg(millis(until))
            .arg(millis(now))
            .arg(only);
        call
    }

    /// Takes a deleted session out of its user's index. Best effort: reading the index
    /// drops what this misses.
    async fn unindex(&self, conn: &Conn, user: &str, id: &SessionId) {
        let (mut by_user, mut by_handle) = (conn.clone(), conn.clone());
        let _ = try_join(
            redis::cmd("ZREM")
                .arg(self.keys.user(user))
                .arg(id.as_str())
                .query_async::<()>(&mut by_user),
            redis::cmd("DEL")
                .arg(self.keys.handle(&id.handle()))
                .query_async::<()>(&mut by_handle),
        )
        .await;
    }

    /// The IDs in a user's index, as stored, after dropping the expired ones.
    async fn indexed(&self, conn: &mut Conn, user: &str) -> Result<Vec<String>, Failure> {
        let now = millis(unix_now());
        let (members,): (Vec<String>,) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.user(user))
            .arg("-inf")
            .arg(format!("({now}"))
            .ignore()
            .cmd("ZRANGE")
            .arg(self.keys.user(user))
            .arg(0)
            .arg(-1)
            .query_async(conn)
            .await?;
        Ok(members)
    }

    /// Stores a session under a key that must be free, indexed under `user` first.
    async fn insert(
        &self,
        conn: &mut Conn,
        id: &SessionId,
        session: &NewSession,
        user: Option<&str>,
        ttl: Duration,
        now: Duration,
    ) -> Result<(), Failure> {
        if let Some(user) = user {
            self.index(conn, user, id, now + ttl, now).await?;
        }
        let key = self.keys.session(id);
        let mut call = CREATE.key(&key);
        call.arg(millis(ttl))
            .arg(&session.data[..])
            .arg(session.created)
            .arg(now.as_secs())
            .arg(session.ends.map(|e| e.to_string()).unwrap_or_default())
            .arg(user.unwrap_or(""));
        let created: i64 = self.commit(conn, &key, &call).await?;
        if created == 0 {
            // Only with a broken random number generator.
            return Err(StoreError::Unavailable(
                "a session already exists under a newly generated ID".into(),
            )
            .into());
        }
        Ok(())
    }

    /// Writes new data into a session, indexed under its user first; with `ver`, only if
    /// the session is at that version.
    async fn write(
        &self,
        conn: &mut Conn,
        id: &SessionId,
        data: &[u8],
        ver: Option<&str>,
        now: Duration,
    ) -> Result<Written, Failure> {
        let user = self.settings.user_of(data);
        if let Some(user) = &user {
            // Only the script reads the session's end: until then, max_age bounds it.
            self.index(conn, user, id, now + self.settings.max_age, now)
                .await?;
        }
        let key = self.keys.session(id);
        let mut call = WRITE.key(&key);
        call.arg(millis(now))
            .arg(millis(self.settings.max_age))
            .arg(now.as_secs())
            .arg(data)
            .arg(user.as_deref().unwrap_or(""))
            .arg(ver.unwrap_or(""));
        let WriteAnswer { written, cut } = self.commit(conn, &key, &call).await?;
        match (&user, &written, cut) {
            (Some(user), Written::Done(_) | Written::Moved(_), Some(ttl)) => {
                self.end_index_at(conn, (user, id), now + ttl, now, "LT")
                    .await;
            }
            // Indexed for a session that is gone (a rotated-away ID past its grace
            // period, say): nothing is there to list or revoke.
            (Some(user), Written::Missing, _) => self.unindex(conn, user, id).await,
            _ => {}
        }
        Ok(written)
    }

    /// Deletes a session; with `ver`, only at that version; with `user`, only if theirs.
    async fn remove(
        &self,
        conn: &mut Conn,
        id: &SessionId,
        ver: Option<&str>,
        owner: Owner<'_>,
    ) -> Result<Written, Failure> {
        let key = self.keys.session(id);
        let mut call = DELETE.key(&key);
        call.arg(ver.unwrap_or(""));
        match owner {
            Owner::Any => call.arg("").arg(""),
            Owner::Anyone => call.arg("").arg("indexed"),
            Owner::User(user) => call.arg(user).arg(""),
        };
        let removed: Written = self.commit(conn, &key, &call).await?;
        if let Written::Done(Some(owner)) | Written::Moved(Some(owner)) = &removed {
            self.unindex(conn, owner, id).await;
        }
        Ok(removed)
    }

    async fn load_session(&self, id: &SessionId, renew: bool) -> Result<Option<Record>, Failure> {
        let mut conn = self.link.conn().await?;
        let key = self.keys.session(id);
        if !renew {
            type Fields = (
                Option<Vec<u8>>,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
            );
            let (data, created, ends, moved, user, ver): Fields = redis::cmd("HMGET")
                .arg(&key)
                .arg("data")
                .arg("created")
                .arg("ends")
                .arg("moved")
                .arg("user")
                .arg("ver")
                .query_async(&mut conn)
                .await?;
            // Past its absolute end, a session is gone, even while its key lasts a moment
            // longer: a TTL set relative to Redis's clock (a rotation's copy, say) runs
            // from when the command arrived, not from when its length was computed.
            let ended = ends
                .and_then(|ends| ends.parse().ok())
                .is_some_and(|ends| Duration::from_secs(ends) <= unix_now());
            if ended {
                return Ok(None);
            }
            if let (Some(_), Some(next)) = (&data, &moved)
                && !self.successor_lives(&mut conn, next).await?
            {
                return Ok(None);
            }
            if let Some(data) = &data
                && user.is_none()
                && moved.is_none()
                && created.is_some()
                && let Some(owner) = self.unindexed_user(data)
            {
                let ver = ver.as_deref().unwrap_or("0");
                self.adopt(&conn, id, &owner, ver, None).await;
            }
            return record(data, created, moved.is_some());
        }
        let now = unix_now();
        let mut call = RENEW.key(&key);
        call.arg(millis(now))
            .arg(millis(self.settings.max_age))
            .arg(now.as_secs());
        let renewed: Option<(Vec<u8>, String, String, String, u64, String)> =
            call.invoke_async(&mut conn).await?;
        let Some((data, created, user, moved, ttl, ver)) = renewed else {
            return Ok(None);
        };
        if !moved.is_empty() && !self.successor_lives(&mut conn, &moved).await? {
            return Ok(None);
        }
        // The index entry must not expire before the session it names.
        let until = now + Duration::from_millis(ttl);
        if !user.is_empty() {
            self.index(&conn, &user, id, until, now).await?;
        } else if moved.is_empty()
            && let Some(owner) = self.unindexed_user(&data)
        {
            self.adopt(&conn, id, &owner, &ver, Some(until)).await;
        }
        record(Some(data), Some(created), !moved.is_empty())
    }

    /// Whether the session a rotated-away ID moved to (`next`) still lives, under that ID
    /// or, rotated again since, a later one. A rotated-away ID is readable for its grace
    /// period only while it does: ending the session (a logout, a revocation by handle)
    /// ends the IDs it left behind as well. (The copy is written before the old ID is
    /// marked, so a rotation under way never looks ended.)
    async fn successor_lives(&self, conn: &mut Conn, next: &str) -> Result<bool, Failure> {
        // Early versions marked a rotated-away ID with `moved = 1`, naming no ID: such a
        // copy lives out its grace period as they meant it to.
        if next == "1" {
            return Ok(true);
        }
        let mut next = next.to_string();
        for _ in 0..SUCCESSOR_HOPS {
            let (created, moved): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(format!("{}{next}", self.keys.prefix))
                .arg("created")
                .arg("moved")
                .query_async(conn)
                .await?;
            match (created, moved) {
                (None, _) => return Ok(false),
                (Some(_), None) => return Ok(true),
                (Some(_), Some(later)) => next = later,
            }
        }
        Ok(false)
    }

    /// The user a session's data names, with `session.user_key` set, for a session whose
    /// hash names none: it was written while `user_key` was not set (or by a proxy without
    /// it), so it is in no index yet. Only data that holds the key's name is parsed.
    fn unindexed_user(&self, data: &[u8]) -> Option<String> {
        let quoted = self.quoted_user_key.as_deref()?;
        data.windows(quoted.len())
            .any(|w| w == quoted)
            .then(|| self.settings.user_of(data))?
    }

    /// Indexes a session read at `ver` under the user its data names, and then names the
    /// user in its hash too, unless it was written meanwhile (that write indexed it as it
    /// should be). Without `until`, the index entry lasts as long as the key does now.
    /// Best effort: a read that fails here is not failed, and the next read tries again.
    async fn adopt(
        &self,
        conn: &Conn,
        id: &SessionId,
        user: &str,
        ver: &str,
        until: Option<Duration>,
    ) {
        let key = self.keys.session(id);
        let now = unix_now();
        let adopted = async {
            let until = match until {
                Some(until) => until,
                None => {
                    let left: i64 = redis::cmd("PTTL")
                        .arg(&key)
                        .query_async(&mut conn.clone())
                        .await?;
                    match u64::try_from(left) {
                        Ok(left) if left > 0 => now + Duration::from_millis(left),
                        _ => return Ok(()),
                    }
                }
            };
            self.index(conn, user, id, until, now).await?;
            let mut call = ADOPT.key(&key);
            call.arg(user).arg(ver);
            call.invoke_async::<i64>(&mut conn.clone()).await?;
            Ok::<(), Failure>(())
        };
        if let Err(Failure::Redis(e)) = adopted.await {
            tracing::debug!(
                "could not index a session written without a user (the next read tries again): {}",
                describe(&e, &self.keys.prefix)
            );
        }
    }

    async fn is_current(&self, id: &SessionId) -> Result<bool, Failure> {
        let mut conn = self.link.conn().await?;
        let (created, moved): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys.session(id))
            .arg("created")
            .arg("moved")
            .query_async(&mut conn)
            .await?;
        Ok(created.is_some() && moved.is_none())
    }

    async fn create_session(&self, id: &SessionId, session: NewSession) -> Result<(), Failure> {
        let now = unix_now();
        let Some(ttl) = self.settings.ttl(session.ends, now) else {
            // Already past its end: nothing to store.
            return Ok(());
        };
        let mut conn = self.link.conn().await?;
        let user = self.settings.user_of(&session.data);
        self.insert(&mut conn, id, &session, user.as_deref(), ttl, now)
            .await
    }

    async fn replace_session(&self, id: &SessionId, data: Bytes) -> Result<Landed, Failure> {
        let mut conn = self.link.conn().await?;
        let written = self.write(&mut conn, id, &data, None, unix_now()).await?;
        Ok(match written {
            Written::Done(_) => Landed::Done,
            Written::Moved(_) => Landed::Moved,
            Written::Missing | Written::Changed { .. } => Landed::Missing,
        })
    }

    /// Waits until no other patch or rotation of `id` (or of a session in the same stripe)
    /// runs through this store. Concurrent ones would race each other's version checks
    /// and, many at once on one session, could run out of attempts (a 503 with Redis in
    /// good health); in turn, each merges into what the one before wrote. A turn not given
    /// within `turn_within` (Redis stalled under the one before) is not waited for: the
    /// version check alone keeps them apart then, as it does across proxies.
    async fn turn(&self, id: &SessionId) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        // FNV-1a over the whole ID: every byte moves the stripe.
        let stripe = id.as_str().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let turn = self.turns.get((stripe % TURNS as u64) as usize)?;
        tokio::time::timeout(self.turn_within, turn.lock())
            .await
            .ok()
    }

    async fn patch_session(&self, id: &SessionId, patch: &Json) -> Result<PatchOutcome, Failure> {
        let _turn = self.turn(id).await;
        let mut conn = self.link.conn().await?;
        let (data, ver): (Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys.session(id))
            .arg("data")
            .arg("ver")
            .query_async(&mut conn)
            .await?;
        let Some(mut data) = data else {
            return Ok(PatchOutcome::Missing);
        };
        let mut ver = ver.unwrap_or_else(|| "0".into());
        for attempt in 0..PATCH_ATTEMPTS {
            if attempt > 0 {
                // Writers that lost the same race spread out instead of colliding again.
                let jitter = rand::random_range(0..=50 * u64::from(attempt.min(40)));
                tokio::time::sleep(Duration::from_micros(jitter)).await;
            }
            let (written, done) = match self.settings.merge(Some(&data), patch)? {
                Merged::Data(merged) => (
                    self.write(&mut conn, id, &merged, Some(&ver), unix_now())
                        .await?,
                    PatchOutcome::Updated(merged),
                ),
                Merged::Empty => (
                    self.remove(&mut conn, id, Some(&ver), Owner::Any).await?,
                    PatchOutcome::Destroyed,
                ),
            };
            match written {
                Written::Done(_) => return Ok(done),
                // The copy a rotation left behind: written, or emptied and deleted.
                Written::Moved(_) => {
                    return Ok(match done {
                        PatchOutcome::Updated(merged) => PatchOutcome::Moved(merged),
                        _ => PatchOutcome::Moved(Bytes::new()),
                    });
                }
                Written::Missing => return Ok(PatchOutcome::Missing),
                // Someone wrote in between: merge into what they wrote.
                Written::Changed { data: now, ver: at } => (data, ver) = (now, at),
            }
        }
        Err(StoreError::Contended.into())
    }

    async fn delete_session(&self, id: &SessionId) -> Result<Landed, Failure> {
        let mut conn = self.link.conn().await?;
        Ok(match self.remove(&mut conn, id, None, Owner::Any).await? {
            Written::Done(_) => Landed::Done,
            Written::Moved(_) => Landed::Moved,
            Written::Missing | Written::Changed { .. } => Landed::Missing,
        })
    }

    /// Copies the session to the new ID, then marks the old one moved, if nothing changed
    /// it in between: a write to the old ID meanwhile is copied again; a rotation that
    /// got there first, or the session's end, undoes the copy. Until the old ID is marked,
    /// it stays as it was, so a failure on the way leaves the session where it is.
    async fn rotate_session(
        &self,
        old: &SessionId,
        new: &SessionId,
        grace: Duration,
    ) -> Result<Rotated, Failure> {
        let _turn = self.turn(old).await;
        let mut conn = self.link.conn().await?;
        for _ in 0..PATCH_ATTEMPTS {
            let now = unix_now();
            let peeked: Option<Peeked> = PEEK
                .key(self.keys.session(old))
                .invoke_async(&mut conn)
                .await?;
            let Some((data, created, ends, user, pttl, moved, ver)) = peeked else {
                return Ok(Rotated::Missing);
            };
            if !moved.is_empty() {
                return Ok(Rotated::Moved);
            }
            let Ok(created) = created.parse() else {
                return Ok(Rotated::Missing);
            };
            let ends = ends.parse().ok();
            // The new ID keeps what is left of the old one's lifetime.
            let ttl = match u64::try_from(pttl) {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ if pttl == -1 => match self.settings.ttl(ends, now) {
                    Some(ttl) => ttl,
                    None => return Ok(Rotated::Missing),
                },
                _ => return Ok(Rotated::Missing),
            };
            let user = (!user.is_empty()).then_some(user);
            let copy = NewSession {
                data: data.into(),
                created,
                ends,
            };
            if let Err(e) = self
                .insert(&mut conn, new, &copy, user.as_deref(), ttl, now)
                .await
            {
                // The old ID is untouched: the session stays there, and no stray copy.
                self.discard(&conn, new, user.as_deref()).await;
                return Err(e);
            }
            // The old ID's index entries last as long as it will, before it may outlive
            // them: revoking the user's sessions must still find it. Cut to exactly that
            // once it is marked.
            let until = grace_until(now, grace, ends);
            if let Some(user) = &user {
                self.end_index_at(&conn, (user, old), until, now, "GT")
                    .await;
            }
            let key = self.keys.session(old);
            let mut call = SHORTEN.key(&key);
            call.arg(secs_up(now + grace))
                .arg(millis(grace))
                .arg(&ver)
                .arg(new.as_str())
                .arg(millis(now))
                .arg(millis(self.settle));
            // A timeout, or under Sentinel no replica confirmed it in time: sent once more
            // (it answers done again if it ran), so that it is confirmed this time.
            let shortened = match self.commit::<Shortened>(&mut conn, &key, &call).await {
                Ok(shortened) => Ok(shortened),
                Err(_) => self.commit::<Shortened>(&mut conn, &key, &call).await,
            };
            let Shortened { status, expires_at } = match shortened {
                Ok(shortened) => shortened,
                // Still failing: whether it ran decides where the session is.
                Err(e) => match self.moved_to(&mut conn, old).await {
                    Ok((Some(to), expires_at)) if to == new.as_str() => Shortened {
                        status: 1,
                        expires_at,
                    },
                    Ok(_) => {
                        // Not moved: the session stays under the old ID, without a copy.
                        self.discard(&conn, new, user.as_deref()).await;
                        return Err(e);
                    }
                    // Nothing known: the copy is the session from here on (it holds the
                    // session whole; the browser is sent its cookie, with the change of this
                    // answer or with the error of the write that fails next). An old ID
                    // left unmarked keeps the session as it was, until it ends.
                    Err(_) => Shortened {
                        status: 1,
                        expires_at: None,
                    },
                },
            };
            if status == 1 {
                if let Some(user) = &user {
                    // Its index entries end when it is no longer readable (at once, if it
                    // was marked after its grace period).
                    let until = expires_at.map_or(until, |at| Duration::from_millis(at).min(until));
                    self.end_index_at(&conn, (user, old), until, now, "EQ")
                        .await;
                }
                return Ok(Rotated::Done);
            }
            // The copy is not the session: gone, moved by another rotation, or out of date.
            self.remove(&mut conn, new, None, Owner::Any).await?;
            match status {
                // Ended meanwhile (a logout, "log out everywhere"): so does its copy.
                0 => return Ok(Rotated::Missing),
                3 => return Ok(Rotated::Moved),
                // Written meanwhile: copy it again.
                _ => {}
            }
        }
        Err(StoreError::Contended.into())
    }

    /// Warns, once at start-up, when Redis may evict keys under memory pressure (a memory
    /// limit and a policy other than `noeviction`): evicting a user's index would make
    /// "log out everywhere" miss sessions that are still there. Best effort: a Redis that
    /// is down, or that refuses `CONFIG` (managed services often do), says nothing.
    pub async fn warn_if_evicting(&self) {
        let asked = async {
            let mut conn = self.link.conn().await.ok()?;
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory")
                .arg("maxmemory-policy")
                .query_async::<HashMap<String, String>>(&mut conn)
                .await
                .ok()
        };
        let Ok(Some(config)) = tokio::time::timeout(Duration::from_secs(5), asked).await else {
            return;
        };
        if config.get("maxmemory").is_none_or(|limit| limit == "0") {
            return;
        }
        if let Some(policy) = config
            .get("maxmemory-policy")
            .filter(|p| p.as_str() != "noeviction")
        {
            tracing::warn!(
                "Redis's maxmemory-policy is {policy}: when Redis is full it may evict session \
                 keys (logging users out) and user index keys (so that revoking a user's \
                 sessions misses some); noeviction makes writes fail with 503 instead"
            );
        }
    }

    /// The ID a session was rotated away to, if it was, and when it expires (unix ms).
    async fn moved_to(
        &self,
        conn: &mut Conn,
        id: &SessionId,
    ) -> Result<(Option<String>, Option<u64>), Failure> {
        let key = self.keys.session(id);
        let (moved, expires_at): (Option<String>, i64) = redis::pipe()
            .cmd("HGET")
            .arg(&key)
            .arg("moved")
            .cmd("PEXPIRETIME")
            .arg(&key)
            .query_async(conn)
            .await?;
        Ok((moved, u64::try_from(expires_at).ok()))
    }

    /// Deletes a copy a rotation could not complete, and its index entries. Plain
    /// commands, not scripts: sent after a timeout, they still run once Redis catches up,
    /// after the copy's own write (a script Redis no longer has cached would fail then,
    /// and the client, having timed out, would not load it again). Nobody else knows the
    /// copy's ID. Best effort.
    async fn discard(&self, conn: &Conn, id: &SessionId, user: Option<&str>) {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(self.keys.session(id)).ignore();
        if let Some(user) = user {
            pipe.cmd("ZREM")
                .arg(self.keys.user(user))
                .arg(id.as_str())
                .ignore()
                .cmd("DEL")
                .arg(self.keys.handle(&id.handle()))
                .ignore();
        }
        let _: RedisResult<()> = pipe.query_async(&mut conn.clone()).await;
    }

    async fn list_user(&self, user: &str) -> Result<Vec<SessionInfo>, Failure> {
        let mut conn = self.link.conn().await?;
        let members = self.indexed(&mut conn, user).await?;
        let ids: Vec<Option<SessionId>> = members.iter().map(|m| stored_id(m)).collect();
        let fields = try_join_all(ids.iter().map(|id| {
            let mut conn = conn.clone();
            async move {
                let Some(id) = id else {
                    return Ok(None);
                };
                redis::cmd("HMGET")
                    .arg(self.keys.session(id))
                    .arg("created")
                    .arg("seen")
                    .arg("user")
                    .query_async::<(Option<String>, Option<String>, Option<String>)>(&mut conn)
                    .await
                    .map(Some)
            }
        }))
        .await?;
        let mut sessions = Vec::new();
        for (id, fields) in ids.iter().zip(fields) {
            // Gone, or no longer this user's: skipped, not dropped (see the module's
            // documentation): it may be written a moment from now.
            let info = id
                .as_ref()
                .zip(fields)
                .and_then(|(id, (created, seen, owner))| {
                    if owner.as_deref() != Some(user) {
                        return None;
                    }
                    Some(SessionInfo {
                        handle: id.handle(),
                        created: created?.parse().ok()?,
                        last_seen: seen?.parse().ok()?,
                    })
                });
            sessions.extend(info);
        }
        Ok(sessions)
    }

    /// Until a pass ends nothing: a rotation that ran alongside has indexed its new ID by
    /// the time the old one could be ended. An entry whose session was not found stays:
    /// the session may be about to be written (sessions are indexed first), and reading
    /// the index drops it once it is past its expiry.
    async fn revoke_user_sessions(&self, user: &str) -> Result<usize, Failure> {
        let mut conn = self.link.conn().await?;
        let mut ended = 0;
        for _ in 0..REVOKE_PASSES {
            let members = self.indexed(&mut conn, user).await?;
            let ids: Vec<SessionId> = members.iter().filter_map(|m| stored_id(m)).collect();
            let removed = try_join_all(ids.iter().map(|id| {
                let mut conn = conn.clone();
                // Only sessions that still belong to the user: one may have changed hands.
                async move { self.remove(&mut conn, id, None, Owner::User(user)).await }
            }))
            .await?;
            let now = removed
                .iter()
                .filter(|w| matches!(w, Written::Done(_) | Written::Moved(_)))
                .count();
            ended += now;
            if now == 0 {
                break;
            }
        }
        Ok(ended)
    }

    async fn revoke_by_handle(&self, handle: &str) -> Result<bool, Failure> {
        let mut conn = self.link.conn().await?;
        // The user the session's last indexing named. Writes racing one another may leave
        // it naming a user the session no longer has; that user's index keeps the entry
        // all the same (a listing skips it without dropping it) for as long as the
        // session lives unwritten, and a later write names the right one.
        let user: Option<String> = redis::cmd("GET")
            .arg(self.keys.handle(handle))
            .query_async(&mut conn)
            .await?;
        let Some(user) = user else {
            return Ok(false);
        };
        let members = self.indexed(&mut conn, &user).await?;
        let Some(id) = members
            .iter()
            .filter_map(|m| stored_id(m))
            .find(|id| id.handle() == handle)
        else {
            return Ok(false);
        };
        // Only while the session names a user, as the memory store's handles do: one that
        // left every index (its user key removed) is no longer anyone's to revoke.
        let removed = self.remove(&mut conn, &id, None, Owner::Anyone).await?;
        Ok(matches!(removed, Written::Done(_) | Written::Moved(_)))
    }

    async fn ping_redis(&self) -> Result<(), Failure> {
        let mut conn = self.link.conn().await?;
        if let Conn::Cluster(cluster) = &mut conn {
            return cluster_serves(cluster).await;
        }
        // A read under the key prefix rather than PING: an ACL user who may PING but not
        // touch the prefix's keys fails every session request, and must not look ready.
        redis::cmd("EXISTS")
            .arg(format!("{}ready", self.keys.prefix))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }
}

/// Succeeds when a Redis Cluster serves keys: every master the client knows answers
/// `CLUSTER INFO` with `cluster_state:ok`. `PING` is not enough: once a master has failed,
/// a cluster with `cluster-require-full-coverage yes` (the default) refuses every key
/// command with CLUSTERDOWN, while each node still answers `PING`.
async fn cluster_serves(conn: &mut ClusterConnection) -> Result<(), Failure> {
    let masters = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    let answers = conn
        .route_command(redis::cmd("CLUSTER").arg("INFO").clone(), masters)
        .await?;
    // Without a response policy, a fan-out answers with each node's reply by address.
    let answers = match answers {
        Value::Map(answers) => answers,
        other => vec![(Value::Nil, other)],
    };
    for (node, answer) in answers {
        let info = match answer {
            Value::ServerError(e) => return Err(RedisError::from(e).into()),
            answer => String::from_redis_value(answer).map_err(RedisError::from)?,
        };
        let state = info
            .lines()
            .find_map(|line| line.trim().strip_prefix("cluster_state:"))
            .unwrap_or("unknown");
        if state != "ok" {
            let node = String::from_redis_value(node).unwrap_or_else(|_| "a master".into());
            return Err(StoreError::Unavailable(format!(
                "Redis Cluster is down: {node} reports cluster_state:{state}, so key \
                 commands fail with CLUSTERDOWN until every hash slot has a reachable master"
            ))
            .into());
        }
    }
    Ok(())
}

/// A session as read from its hash; one without a readable `created` was not written by
/// the proxy and counts as absent.
/// A stored session as read. The proxy stores compact JSON objects only: `data` that is
/// not one was written by something else, and is refused (503) rather than handed to
/// the application as its session, or taken for no session (which would clear the
/// cookie).
fn record(
    data: Option<Vec<u8>>,
    created: Option<String>,
    moved: bool,
) -> Result<Option<Record>, Failure> {
    let (Some(data), Some(created)) = (data, created) else {
        return Ok(None);
    };
    let Ok(created) = created.parse() else {
        return Ok(None);
    };
    if data.first() != Some(&b'{') || data.last() != Some(&b'}') {
        return Err(StoreError::Unavailable(
            "the stored session is not a JSON object: its data was written by something other \
             than session-proxy"
                .into(),
        )
        .into());
    }
    Ok(Some(Record {
        data: Bytes::from(data),
        created,
        moved,
    }))
}

impl Store for RedisStore {
    fn load<'a>(&'a self, id: &'a SessionId, renew: bool) -> StoreFuture<'a, Option<Record>> {
        Box::pin(self.run(self.load_session(id, renew)))
    }

    fn create<'a>(&'a self, id: &'a SessionId, session: NewSession) -> StoreFuture<'a, ()> {
        Box::pin(self.run(self.create_session(id, session)))
    }

    fn replace<'a>(&'a self, id: &'a SessionId, data: Bytes) -> StoreFuture<'a, Landed> {
        Box::pin(self.run(self.replace_session(id, data)))
    }

    fn current<'a>(&'a self, id: &'a SessionId) -> StoreFuture<'a, bool> {
        Box::pin(self.run(self.is_current(id)))
    }

    fn patch<'a>(&'a self, id: &'a SessionId, patch: &'a Json) -> StoreFuture<'a, PatchOutcome> {
        Box::pin(self.run(self.patch_session(id, patch)))
    }

    fn delete<'a>(&'a self, id: &'a SessionId) -> StoreFuture<'a, Landed> {
        Box::pin(self.run(self.delete_session(id)))
    }

    fn rotate<'a>(
        &'a self,
        old: &'a SessionId,
        new: &'a SessionId,
        grace: Duration,
    ) -> StoreFuture<'a, Rotated> {
        Box::pin(self.run(self.rotate_session(old, new, grace)))
    }

    fn user_sessions<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<SessionInfo>> {
        Box::pin(self.run(self.list_user(user)))
    }

    fn revoke_user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, usize> {
        Box::pin(self.run(self.revoke_user_sessions(user)))
    }

    fn revoke_handle<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(self.run(self.revoke_by_handle(handle)))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.run(self.ping_redis()))
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn error_details_lose_what_could_be_keys_and_arguments() {
        let id = "Wm9vbGFuZGVyLWZvby1iYXItYmF6LXF1eC1xdXV4LWZvbw";
        assert_eq!(
            redact(&format!(
                "unknown command 'EVALSHA', with args beginning with: 'abc' '1' 'session:{id}' '{{\"a\":1}}' "
            )),
            "unknown command 'EVALSHA'"
        );
        assert_eq!(
            redact(&format!(
                "User proxy has no permissions to access the 'session:{id}' key"
            )),
            "User proxy has no permissions to access the '…' key"
        );
        assert_eq!(
            redact(&format!("no such key session:{id}, sorry")),
            "no such key session:…, sorry"
        );
        assert_eq!(
            redact("DB index is out of range"),
            "DB index is out of range"
        );
        assert_eq!(
            redact("User proxy has no permissions to run the 'evalsha' command"),
            "User proxy has no permissions to run the 'evalsha' command"
        );
    }
}
