//! The in-process store: sessions in sharded hash maps, expired by a background sweep.
//!
//! Every session has a deadline; a lookup past it treats the session as gone at once,
//! and the sweep reclaims its memory within a second. The store holds at most
//! `store.max_sessions` sessions: at the bound a *new* session is refused
//! (`StoreError::Full`, answered 503 and counted), while existing sessions keep working.
//! Refusing rather than evicting keeps a flood of new visitors from logging out the
//! users already signed in. A rotation is not refused at the bound: for its grace period
//! the old ID is one entry more, so the count may pass the bound by the rotations of the
//! last `rotate_grace` seconds.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::{
    Landed, NewSession, PatchOutcome, REVOKE_PASSES, Record, Rotated, SUCCESSOR_HOPS, SessionInfo,
    Store, StoreError, StoreFuture, StoreSettings, grace_until, secs_up, unix_now,
};
use crate::session::codec::Merged;
use crate::session::id::SessionId;

const SHARDS: usize = 64;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How soon a store refusing sessions at its bound sweeps out the ended ones, rather than
/// at the next regular sweep: the delay also spaces such sweeps apart.
const SWEEP_SOON_EVERY: Duration = Duration::from_millis(50);

/// Most attempts a rotation makes at copying a session that is being written meanwhile.
const ROTATE_ATTEMPTS: usize = 8;

/// One stored session, kept small: a million of these is a normal load.
struct Entry {
    /// The JSON, exactly as long as it is (a read copies it out).
    data: Box<[u8]>,
    /// Unix milliseconds after which the entry is gone.
    deadline: u64,
    /// Unix seconds.
    created: u32,
    /// Unix seconds at which the session ends whatever its activity; 0: never.
    ends: u32,
    /// Unix seconds of the last write or renewal.
    last_seen: u32,
    user: Option<Arc<str>>,
    /// Rotated away to this ID: living out its grace period, while the session there
    /// lives.
    moved: Option<SessionId>,
}

/// Unix seconds in the entry's compact form (valid until 2106; later saturates).
fn secs32(secs: u64) -> u32 {
    u32::try_from(secs).unwrap_or(u32::MAX)
}

impl Entry {
    fn live(&self, now_ms: u64) -> bool {
        self.deadline > now_ms
    }

    fn ends(&self) -> Option<u64> {
        (self.ends != 0).then_some(u64::from(self.ends))
    }

    /// Moves the deadline on to `deadline`, unless the entry was rotated away: it ends
    /// when its grace period does, whatever reads or writes it meanwhile.
    fn extend(&mut self, deadline: u64) {
        if self.moved.is_none() {
            self.deadline = deadline;
        }
    }
}

/// Entries are boxed: the table keeps spare slots as it grows, and a spare slot of a
/// pointer costs far less than a spare slot of a whole entry.
type Shard = HashMap<SessionId, Box<Entry>>;

/// The memory store. Cheap to share: wrap it in an `Arc`.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    count: AtomicUsize,
    max_sessions: usize,
    /// Asks the sweeper for a sweep now: a store refused a session at its bound, which
    /// sessions that ended since the last sweep may still be holding.
    sweep_soon: Arc<tokio::sync::Notify>,
    settings: StoreSettings,
    /// The per-user index. Entries leave it when their session is deleted, revoked or
    /// swept.
    users: Mutex<UserIndex>,
}

/// Sessions by user, and indexed sessions by public handle. A set per user: one user
/// may hold many sessions (a shared account, a script logging in again and again), and
/// adding or removing one must not cost a scan of them all.
#[derive(Default)]
struct UserIndex {
    ids: HashMap<Arc<str>, HashSet<SessionId>>,
    by_handle: HashMap<String, SessionId>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind, still consistent enough
    // to serve: no invariant spans more than one statement under these locks.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

impl MemoryStore {
    pub fn new(settings: StoreSettings, max_sessions: usize) -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            count: AtomicUsize::new(0),
            max_sessions,
            settings,
            users: Mutex::new(UserIndex::default()),
            sweep_soon: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Starts the background sweep; it stops when the store is dropped. Each sweep runs
    /// on a blocking thread: a large one must not hold up the runtime's other work.
    pub fn start_sweeper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let soon = self.sweep_soon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Whether a refusal may sweep before the next tick: not after an early sweep
            // that freed nothing (a store full of live sessions), until the tick.
            let mut eager = true;
            loop {
                let early = tokio::select! {
                    _ = tick.tick() => false,
                    () = soon.notified(), if eager => {
                        // At most one extra sweep per `SWEEP_SOON_EVERY`, however many
                        // sessions a full store refuses meanwhile.
                        tokio::time::sleep(SWEEP_SOON_EVERY).await;
                        true
                    }
                };
                let Some(store) = weak.upgrade() else { return };
                match tokio::task::spawn_blocking(move || store.sweep()).await {
                    Ok(freed) => eager = !early || freed > 0,
                    Err(_) => tracing::warn!("the memory store's sweep failed"),
                }
            }
        });
    }

    /// Removes every expired session and its index entry; returns how many it removed.
    pub fn sweep(&self) -> usize {
        let now = millis(unix_now());
        let mut freed = 0;
        for shard in self.shards.iter() {
            let mut gone = Vec::new();
            lock(shard).retain(|id, entry| {
                let live = entry.live(now);
                if !live {
                    gone.push((id.clone(), entry.user.take()));
                }
                live
            });
            self.count.fetch_sub(gone.len(), Ordering::Relaxed);
            freed += gone.len();
            for (id, user) in gone {
                self.unindex(&id, user.as_deref());
            }
        }
        freed
    }

    fn shard(&self, id: &SessionId) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(id) as usize;
        &self.shards[h % SHARDS]
    }

    fn deadline(&self, ends: Option<u64>, now: Duration) -> Option<u64> {
        self.settings.ttl(ends, now).map(|ttl| millis(now + ttl))
    }

    /// Stores `data` under an existing entry: new deadline, re-indexed if its user changed.
    fn write_entry(&self, id: &SessionId, entry: &mut Entry, data: Bytes, now: Duration) -> bool {
        let Some(deadline) = self.deadline(entry.ends(), now) else {
            return false;
        };
        let user = self.settings.user_of(&data).map(Arc::<str>::from);
        entry.data = Box::from(&data[..]);
        entry.extend(deadline);
        entry.last_seen = secs32(now.as_secs());
        if user != entry.user {
            self.reindex(id, entry.user.as_deref(), user.as_ref());
            entry.user = user;
        }
        true
    }

    /// Moves a session from one user's index to another's (either may be none) in one
    /// step: a revocation by handle never finds the session in neither.
    fn reindex(&self, id: &SessionId, from: Option<&str>, to: Option<&Arc<str>>) {
        let handle = id.handle();
        let mut index = lock(&self.users);
        if let Some(from) = from
            && let Some(ids) = index.ids.get_mut(from)
        {
            ids.remove(id);
            if ids.is_empty() {
                index.ids.remove(from);
            }
        }
        match to {
            Some(to) => {
                index.ids.entry(to.clone()).or_default().insert(id.clone());
                index.by_handle.insert(handle, id.clone());
            }
            None => {
                index.by_handle.remove(&handle);
            }
        }
    }

    /// Removes `id`; returns whether a live session was there.
    fn remove(&self, id: &SessionId) -> bool {
        let removed = lock(self.shard(id)).remove(id);
        self.forget(id, removed)
    }

    /// Removes `id` if it still belongs to `user` (it may have changed hands since the
    /// index was read); returns whether a live session was removed.
    fn remove_owned(&self, id: &SessionId, user: &str) -> bool {
        let removed = {
            let mut shard = lock(self.shard(id));
            match shard.get(id) {
                Some(entry) if entry.user.as_deref() == Some(user) => shard.remove(id),
                _ => None,
            }
        };
        self.forget(id, removed)
    }

    /// Accounts for an entry taken out of its shard; returns whether it was live.
    fn forget(&self, id: &SessionId, removed: Option<Box<Entry>>) -> bool {
        let Some(entry) = removed else { return false };
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.unindex(id, entry.user.as_deref());
        entry.live(millis(unix_now()))
    }

    fn index(&self, id: &SessionId, user: &Arc<str>) {
        self.reindex(id, None, Some(user));
    }

    fn unindex(&self, id: &SessionId, user: Option<&str>) {
        if user.is_some() {
            self.reindex(id, user, None);
        }
    }

    fn ids_of(&self, user: &str) -> Vec<SessionId> {
        lock(&self.users)
            .ids
            .get(user)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Stores a new entry. Counted first, so that concurrent inserts cannot pass the bound
    /// together; indexed before it is stored, so that a sweep between the two cannot leave
    /// an index entry behind (the index may name a session not stored yet, never miss one).
    fn insert(&self, id: &SessionId, entry: Entry, bounded: bool) -> Result<(), StoreError> {
        if bounded {
            self.count
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < self.max_sessions).then_some(n + 1)
                })
                .map_err(|_| {
                    self.sweep_soon.notify_one();
                    StoreError::Full
                })?;
        } else {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(user) = &entry.user {
            self.index(id, user);
        }
        let previous = lock(self.shard(id)).insert(id.clone(), Box::new(entry));
        if previous.is_some() {
            // Only with a broken random number generator: one entry replaced another.
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn load_now(&self, id: &SessionId, renew: bool) -> Option<Record> {
        let now = unix_now();
        let mut shard = lock(self.shard(id));
        let entry = shard.get_mut(id)?;
        if !entry.live(millis(now)) {
            return None;
        }
        if renew {
            // Only the deadline moves; the data is not rewritten.
            entry.extend(self.deadline(entry.ends(), now)?);
            entry.last_seen = secs32(now.as_secs());
        }
        let record = Record {
            data: Bytes::copy_from_slice(&entry.data),
            created: u64::from(entry.created),
            moved: entry.moved.is_some(),
        };
        let next = entry.moved.clone();
        drop(shard);
        match next {
            Some(next) if !self.successor_lives(&next, millis(now)) => None,
            _ => Some(record),
        }
    }

    /// Whether the session a rotated-away ID moved to (`next`) still lives, under that ID
    /// or, rotated again since, a later one. A rotated-away ID is readable for its grace
    /// period only while it does: ending the session (a logout, a revocation by handle)
    /// ends the IDs it left behind as well.
    fn successor_lives(&self, next: &SessionId, now_ms: u64) -> bool {
        let mut next = next.clone();
        for _ in 0..SUCCESSOR_HOPS {
            let shard = lock(self.shard(&next));
            match shard.get(&next).filter(|e| e.live(now_ms)) {
                None => return false,
                Some(entry) => match &entry.moved {
                    None => return true,
                    Some(later) => next = later.clone(),
                },
            }
        }
        false
    }

    fn patch_now(&self, id: &SessionId, patch: &Value) -> Result<PatchOutcome, StoreError> {
        let now = unix_now();
        let mut shard = lock(self.shard(id));
        let Some(entry) = shard.get_mut(id).filter(|e| e.live(millis(now))) else {
            return Ok(PatchOutcome::Missing);
        };
        // Under the shard lock: no other write to this session can interleave.
        match self.settings.merge(Some(&entry.data), patch)? {
            Merged::Data(data) => {
                if !self.write_entry(id, entry, data.clone(), now) {
                    Ok(PatchOutcome::Missing)
                } else if entry.moved.is_some() {
                    Ok(PatchOutcome::Moved(data))
                } else {
                    Ok(PatchOutcome::Updated(data))
                }
            }
            Merged::Empty => {
                // Removed under the same lock, so that no write lands in between.
                let removed = shard.remove(id);
                drop(shard);
                let moved = removed.as_ref().is_some_and(|e| e.moved.is_some());
                self.forget(id, removed);
                if moved {
                    Ok(PatchOutcome::Moved(Bytes::new()))
                } else {
                    Ok(PatchOutcome::Destroyed)
                }
            }
        }
    }

    fn rotate_now(
        &self,
        old: &SessionId,
        new: &SessionId,
        grace: Duration,
    ) -> Result<Rotated, StoreError> {
        for _ in 0..ROTATE_ATTEMPTS {
            let now = unix_now();
            // The copy is stored under the new ID before the old one is marked: a read of
            // the old ID from then on finds the session it moved to.
            let copy = {
                let shard = lock(self.shard(old));
                let Some(entry) = shard.get(old).filter(|e| e.live(millis(now))) else {
                    return Ok(Rotated::Missing);
                };
                if entry.moved.is_some() {
                    return Ok(Rotated::Moved);
                }
                Entry {
                    data: entry.data.clone(),
                    created: entry.created,
                    ends: entry.ends,
                    deadline: entry.deadline,
                    last_seen: secs32(now.as_secs()),
                    user: entry.user.clone(),
                    moved: None,
                }
            };
            let copied = copy.data.clone();
            self.insert(new, copy, false)?;
            let mut shard = lock(self.shard(old));
            let undone = match shard.get_mut(old).filter(|e| e.live(millis(now))) {
                // Ended meanwhile (a logout, "log out everywhere"): so does its copy.
                None => Some(Rotated::Missing),
                // A rotation that got there first.
                Some(entry) if entry.moved.is_some() => Some(Rotated::Moved),
                // Written meanwhile: copied again.
                Some(entry) if entry.data != copied => None,
                Some(entry) => {
                    entry.moved = Some(new.clone());
                    // Readable for the whole grace period from now, unless the session
                    // ends first.
                    entry.deadline = millis(grace_until(now, grace, entry.ends()));
                    let grace_end = secs32(secs_up(now + grace));
                    entry.ends = if entry.ends == 0 {
                        grace_end
                    } else {
                        entry.ends.min(grace_end)
                    };
                    return Ok(Rotated::Done);
                }
            };
            drop(shard);
            self.remove(new);
            if let Some(undone) = undone {
                return Ok(undone);
            }
        }
        Err(StoreError::Contended)
    }

    /// A user's live sessions, the soonest to end first (as the Redis store lists them).
    fn sessions_of(&self, user: &str) -> Vec<SessionInfo> {
        let now = millis(unix_now());
        let mut sessions: Vec<(u64, SessionInfo)> = self
            .ids_of(user)
            .into_iter()
            .filter_map(|id| {
                let shard = lock(self.shard(&id));
                let entry = shard
                    .get(&id)
                    .filter(|e| e.live(now) && e.user.as_deref() == Some(user))?;
                let info = SessionInfo {
                    handle: id.handle(),
                    created: u64::from(entry.created),
                    last_seen: u64::from(entry.last_seen),
                };
                Some((entry.deadline, info))
            })
            .collect();
        sessions.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.handle.cmp(&b.1.handle)));
        sessions.into_iter().map(|(_, info)| info).collect()
    }

    fn revoke_handle_now(&self, handle: &str) -> bool {
        let found = lock(&self.users).by_handle.get(handle).cloned();
        found.is_some_and(|id| self.remove(&id))
    }
}

impl Store for MemoryStore {
    fn load<'a>(&'a self, id: &'a SessionId, renew: bool) -> StoreFuture<'a, Option<Record>> {
        let record = self.load_now(id, renew);
        Box::pin(async move { Ok(record) })
    }

    fn create<'a>(&'a self, id: &'a SessionId, session: NewSession) -> StoreFuture<'a, ()> {
        let now = unix_now();
        let result = match self.deadline(session.ends, now) {
            // Already past its end: nothing to store.
            None => Ok(()),
            Some(deadline) => {
                let entry = Entry {
                    user: self.settings.user_of(&session.data).map(Arc::from),
                    data: Box::from(&session.data[..]),
                    created: secs32(session.created),
                    ends: session.ends.map_or(0, secs32),
                    deadline,
                    last_seen: secs32(now.as_secs()),
                    moved: None,
                };
                self.insert(id, entry, true)
            }
        };
        Box::pin(async move { result })
    }

    fn replace<'a>(&'a self, id: &'a SessionId, data: Bytes) -> StoreFuture<'a, Landed> {
        let now = unix_now();
        let mut shard = lock(self.shard(id));
        let written = match shard.get_mut(id).filter(|e| e.live(millis(now))) {
            Some(entry) => match (
                self.write_entry(id, entry, data, now),
                entry.moved.is_some(),
            ) {
                (false, _) => Landed::Missing,
                (true, false) => Landed::Done,
                (true, true) => Landed::Moved,
            },
            None => Landed::Missing,
        };
        drop(shard);
        Box::pin(async move { Ok(written) })
    }

    fn current<'a>(&'a self, id: &'a SessionId) -> StoreFuture<'a, bool> {
        let now = millis(unix_now());
        let current = lock(self.shard(id))
            .get(id)
            .is_some_and(|e| e.live(now) && e.moved.is_none());
        Box::pin(async move { Ok(current) })
    }

    fn patch<'a>(&'a self, id: &'a SessionId, patch: &'a Value) -> StoreFuture<'a, PatchOutcome> {
        let outcome = self.patch_now(id, patch);
        Box::pin(async move { outcome })
    }

    fn delete<'a>(&'a self, id: &'a SessionId) -> StoreFuture<'a, Landed> {
        let removed = lock(self.shard(id)).remove(id);
        let moved = removed.as_ref().is_some_and(|e| e.moved.is_some());
        let landed = match (self.forget(id, removed), moved) {
            (false, _) => Landed::Missing,
            (true, false) => Landed::Done,
            (true, true) => Landed::Moved,
        };
        Box::pin(async move { Ok(landed) })
    }

    fn rotate<'a>(
        &'a self,
        old: &'a SessionId,
        new: &'a SessionId,
        grace: Duration,
    ) -> StoreFuture<'a, Rotated> {
        let rotated = self.rotate_now(old, new, grace);
        Box::pin(async move { rotated })
    }

    fn user_sessions<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<SessionInfo>> {
        let sessions = self.sessions_of(user);
        Box::pin(async move { Ok(sessions) })
    }

    fn revoke_user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, usize> {
        // Until a pass ends nothing: a rotation that ran alongside has indexed its new ID
        // by the time the old one could be ended.
        let mut ended = 0;
        for _ in 0..REVOKE_PASSES {
            let now = self
                .ids_of(user)
                .iter()
                .filter(|id| self.remove_owned(id, user))
                .count();
            ended += now;
            if now == 0 {
                break;
            }
        }
        Box::pin(async move { Ok(ended) })
    }

    fn revoke_handle<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, bool> {
        let ended = self.revoke_handle_now(handle);
        Box::pin(async move { Ok(ended) })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn session_count(&self) -> Option<usize> {
        Some(self.count.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::id::IdShape;

    fn store(max_age: Duration, max_sessions: usize) -> MemoryStore {
        MemoryStore::new(
            StoreSettings {
                max_age,
                user_key: Some("user".into()),
                max_bytes: 4096,
            },
            max_sessions,
        )
    }

    fn new_session(data: &'static str) -> NewSession {
        NewSession {
            data: Bytes::from_static(data.as_bytes()),
            created: unix_now().as_secs(),
            ends: None,
        }
    }

    fn id() -> SessionId {
        SessionId::generate(IdShape::default())
    }

    /// A session whose user changes is under one user or the other at every moment,
    /// never under neither: a revocation by its handle, whenever it comes, finds it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_changing_user_keeps_its_handle_throughout() {
        let s = Arc::new(store(Duration::from_secs(60), 10));
        let a = id();
        s.create(&a, new_session(r#"{"user":"ann"}"#))
            .await
            .unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checker = {
            let (s, handle, done) = (s.clone(), a.handle(), done.clone());
            tokio::task::spawn_blocking(move || {
                let mut missing = 0;
                while !done.load(Ordering::Relaxed) {
                    let found = lock(&s.users).by_handle.contains_key(&handle);
                    missing += usize::from(!found);
                }
                missing
            })
        };
        for user in ["bob", "carl", "ann"].iter().cycle().take(30_000) {
            let data = Bytes::from(format!(r#"{{"user":"{user}"}}"#));
            assert_eq!(s.replace(&a, data).await.unwrap(), Landed::Done);
        }
        done.store(true, Ordering::Relaxed);
        assert_eq!(checker.await.unwrap(), 0, "times the handle led nowhere");
        assert!(s.revoke_handle(&a.handle()).await.unwrap());
        assert!(s.load(&a, false).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn get_put_delete_round_trip() {
        let s = store(Duration::from_secs(60), 10);
        let a = id();
        assert_eq!(s.load(&a, false).await.unwrap(), None);
        s.create(&a, new_session(r#"{"a":1}"#)).await.unwrap();
        assert_eq!(
            &s.load(&a, false).await.unwrap().unwrap().data[..],
            br#"{"a":1}"#
        );
        assert_eq!(
            s.replace(&a, Bytes::from_static(br#"{"a":2}"#))
                .await
                .unwrap(),
            Landed::Done
        );
        assert_eq!(
            &s.load(&a, false).await.unwrap().unwrap().data[..],
            br#"{"a":2}"#
        );
        s.delete(&a).await.unwrap();
        s.delete(&a).await.unwrap();
        assert_eq!(s.load(&a, false).await.unwrap(), None);
        assert!(
            s.replace(&a, Bytes::from_static(br#"{"a":3}"#))
                .await
                .unwrap()
                == Landed::Missing
        );
        assert_eq!(s.session_count(), Some(0));
    }

    #[tokio::test]
    async fn expired_sessions_are_invisible_then_swept() {
        let s = store(Duration::from_millis(50), 10);
        let a = id();
        s.create(&a, new_session(r#"{"a":1}"#)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(s.load(&a, false).await.unwrap(), None);
        assert_eq!(s.session_count(), Some(1));
        s.sweep();
        assert_eq!(s.session_count(), Some(0));
    }

    #[tokio::test]
    async fn renew_moves_the_deadline() {
        let s = store(Duration::from_millis(150), 10);
        let a = id();
        s.create(&a, new_session(r#"{"a":1}"#)).await.unwrap();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            assert!(s.load(&a, true).await.unwrap().is_some());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(s.load(&a, false).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn new_sessions_are_refused_at_the_bound_existing_ones_still_written() {
        let s = store(Duration::from_secs(60), 2);
        let (a, b, c) = (id(), id(), id());
        s.create(&a, new_session(r#"{"a":1}"#)).await.unwrap();
        s.create(&b, new_session(r#"{"b":1}"#)).await.unwrap();
        assert!(matches!(
            s.create(&c, new_session(r#"{"c":1}"#)).await,
            Err(StoreError::Full)
        ));
        assert_eq!(
            s.replace(&a, Bytes::from_static(br#"{"a":2}"#))
                .await
                .unwrap(),
            Landed::Done
        );
    }

    /// Sessions that ended since the last sweep do not keep a full store refusing new
    /// ones until the next regular sweep (a second away): a refusal sweeps them out.
    #[tokio::test]
    async fn a_store_full_of_ended_sessions_makes_room_at_once() {
        let s = Arc::new(store(Duration::from_millis(200), 2));
        // The regular sweeps now, and a second from now.
        let started = std::time::Instant::now();
        s.start_sweeper();
        for _ in 0..2 {
            s.create(&id(), new_session(r#"{"a":1}"#)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let fresh = id();
        let mut refused = 0;
        while s.create(&fresh, new_session(r#"{"b":1}"#)).await.is_err() {
            refused += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "room only after {:?} ({refused} refusals): at the regular sweep",
            started.elapsed()
        );
        assert_eq!(s.session_count(), Some(1));
    }

    #[tokio::test]
    async fn an_id_rotated_away_is_not_rotated_again() {
        let s = store(Duration::from_secs(600), 10);
        let (old, first, second) = (id(), id(), id());
        s.create(&old, new_session(r#"{"cart":1}"#)).await.unwrap();
        let grace = Duration::from_secs(1);
        assert_eq!(s.rotate(&old, &first, grace).await.unwrap(), Rotated::Done);
        let patch = serde_json::json!({"user": "ann"});
        assert!(matches!(
            s.patch(&first, &patch).await.unwrap(),
            PatchOutcome::Updated(_)
        ));
        assert_eq!(
            s.rotate(&old, &second, grace).await.unwrap(),
            Rotated::Moved
        );
        assert!(s.load(&second, false).await.unwrap().is_none());
        let kept = s.load(&first, false).await.unwrap().unwrap();
        assert_eq!(&kept.data[..], br#"{"cart":1,"user":"ann"}"#);
        assert!(!kept.moved && s.load(&old, false).await.unwrap().unwrap().moved);
    }

    #[tokio::test]
    async fn a_rotated_away_id_lasts_its_whole_grace_period_and_no_longer() {
        let s = store(Duration::from_secs(600), 10);
        let (old, new) = (id(), id());
        s.create(&old, new_session(r#"{"cart":1}"#)).await.unwrap();
        // Late in a second, so that the grace period ends late in the next one: a whole
        // second rounded down would end it 0.6-0.8 s early.
        while !(600..800).contains(&unix_now().subsec_millis()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rotated = std::time::Instant::now();
        let grace = Duration::from_secs(1);
        assert_eq!(s.rotate(&old, &new, grace).await.unwrap(), Rotated::Done);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Past the whole second, inside the grace period: a renewal and a write through
        // the old ID still find it.
        assert!(s.load(&old, true).await.unwrap().is_some(), "renewal");
        let write = s.replace(&old, Bytes::from_static(br#"{"cart":2}"#));
        assert_eq!(write.await.unwrap(), Landed::Moved);
        assert!(rotated.elapsed() < grace, "checked within the grace period");
        // Neither carried it past the end of the grace period.
        tokio::time::sleep(grace.saturating_sub(rotated.elapsed()) + Duration::from_millis(20))
            .await;
        assert!(s.load(&old, false).await.unwrap().is_none(), "past the end");
        assert!(s.load(&new, false).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_rotated_away_id_lasts_its_grace_period_even_past_its_idle_timeout() {
        // Rotated with less idle time left than the grace period.
        let s = store(Duration::from_millis(400), 10);
        let (old, new) = (id(), id());
        s.create(&old, new_session(r#"{"cart":1}"#)).await.unwrap();
        let grace = Duration::from_millis(1_200);
        let rotated = std::time::Instant::now();
        assert_eq!(s.rotate(&old, &new, grace).await.unwrap(), Rotated::Done);
        // Renewals and writes through it meanwhile neither shorten nor lengthen it. (The
        // session under the new ID is kept alive: the old ID ends with it.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(s.load(&old, true).await.unwrap().is_some());
        let write = s.replace(&old, Bytes::from_static(br#"{"cart":2}"#));
        assert_eq!(write.await.unwrap(), Landed::Moved);
        for _ in 0..2 {
            assert!(s.load(&new, true).await.unwrap().is_some());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(
            s.load(&old, false).await.unwrap().is_some(),
            "within the grace"
        );
        tokio::time::sleep(grace.saturating_sub(rotated.elapsed()) + Duration::from_millis(20))
            .await;
        assert!(
            s.load(&old, false).await.unwrap().is_none(),
            "past the grace"
        );
    }

    #[tokio::test]
    async fn a_rotated_away_id_still_ends_with_its_session() {
        let s = store(Duration::from_secs(600), 10);
        let (old, new) = (id(), id());
        let ends = unix_now().as_secs() + 1;
        let session = NewSession {
            ends: Some(ends),
            ..new_session(r#"{"cart":1}"#)
        };
        s.create(&old, session).await.unwrap();
        let grace = Duration::from_secs(5);
        assert_eq!(s.rotate(&old, &new, grace).await.unwrap(), Rotated::Done);
        while unix_now().as_secs() < ends {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(s.load(&old, false).await.unwrap().is_none());
        assert!(s.load(&new, false).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_revocation_spares_a_session_that_changed_hands() {
        let s = store(Duration::from_secs(600), 10);
        let a = id();
        s.create(&a, new_session(r#"{"user":"ann"}"#))
            .await
            .unwrap();
        // As a revocation of ann's sessions would find it, had it read her index just
        // before the session became bob's.
        assert_eq!(
            s.replace(&a, Bytes::from_static(br#"{"user":"bob"}"#))
                .await
                .unwrap(),
            Landed::Done
        );
        assert!(!s.remove_owned(&a, "ann"));
        assert!(s.load(&a, false).await.unwrap().is_some());
        assert!(s.remove_owned(&a, "bob"));
    }

    #[test]
    fn a_rotation_racing_a_revocation_leaves_no_session_of_the_user() {
        use futures_util::FutureExt;
        let s = store(Duration::from_secs(600), 1_000);
        let grace = Duration::from_secs(60);
        for round in 0..2_000 {
            let (old, new) = (id(), id());
            s.create(&old, new_session(r#"{"user":"ann"}"#))
                .now_or_never()
                .unwrap()
                .unwrap();
            std::thread::scope(|scope| {
                scope.spawn(|| s.rotate_now(&old, &new, grace).unwrap());
                scope.spawn(|| s.revoke_user("ann").now_or_never().unwrap().unwrap());
            });
            for (which, id) in [("old", &old), ("new", &new)] {
                assert!(
                    s.load_now(id, false).is_none(),
                    "round {round}: the {which} ID survived"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_user_is_listed_soonest_ending_first() {
        let s = store(Duration::from_secs(600), 10);
        let now = unix_now().as_secs();
        let ids = [id(), id(), id()];
        // Each ends earlier than the one before: the listing is the other way round.
        for (n, id) in ids.iter().enumerate() {
            let mut session = new_session(r#"{"user":"ann"}"#);
            session.ends = Some(now + 500 - 100 * n as u64);
            s.create(id, session).await.unwrap();
        }
        let listed: Vec<String> = s
            .user_sessions("ann")
            .await
            .unwrap()
            .into_iter()
            .map(|info| info.handle)
            .collect();
        let expected: Vec<String> = ids.iter().rev().map(SessionId::handle).collect();
        assert_eq!(listed, expected);
    }

    #[tokio::test]
    async fn user_index_lists_and_revokes_and_forgets_expired() {
        let s = store(Duration::from_millis(100), 10);
        let (a, b, c) = (id(), id(), id());
        s.create(&a, new_session(r#"{"user":"ann"}"#))
            .await
            .unwrap();
        s.create(&b, new_session(r#"{"user":"ann"}"#))
            .await
            .unwrap();
        s.create(&c, new_session(r#"{"user":"bob"}"#))
            .await
            .unwrap();
        assert_eq!(s.user_sessions("ann").await.unwrap().len(), 2);
        assert!(s.revoke_handle(&b.handle()).await.unwrap());
        assert_eq!(s.revoke_user("ann").await.unwrap(), 1);
        assert!(s.load(&c, false).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.sweep();
        let index = lock(&s.users);
        assert!(index.ids.is_empty() && index.by_handle.is_empty());
    }
}
