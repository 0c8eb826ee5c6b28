//! A store that counts and times every operation of the store it wraps.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use super::{
    Landed, NewSession, PatchOutcome, Record, Rotated, SessionInfo, Store, StoreError, StoreFuture,
};
use crate::metrics::{Metrics, StoreOp};
use crate::session::id::SessionId;

/// Wraps any backend so that `/metrics` shows operations, latency and errors by
/// operation, without the backends knowing about metrics.
pub struct Metered {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Metered {
        Metered { inner, metrics }
    }

    fn measure<'a, T: Send + 'a>(
        &'a self,
        op: StoreOp,
        call: impl Future<Output = Result<T, StoreError>> + Send + 'a,
    ) -> StoreFuture<'a, T> {
        Box::pin(async move {
            let started = Instant::now();
            let result = call.await;
            let kind = result.as_ref().err().map(|e| match e {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::Full => "full",
                StoreError::Contended => "contended",
                StoreError::TooLarge(_) => "too_large",
            });
            self.metrics.store_op(op, started.elapsed(), kind);
            result
        })
    }
}

impl Store for Metered {
    fn load<'a>(&'a self, id: &'a SessionId, renew: bool) -> StoreFuture<'a, Option<Record>> {
        let op = if renew {
            StoreOp::LoadRenew
        } else {
            StoreOp::Load
        };
        self.measure(op, self.inner.load(id, renew))
    }

    fn create<'a>(&'a self, id: &'a SessionId, session: NewSession) -> StoreFuture<'a, ()> {
        self.measure(StoreOp::Create, self.inner.create(id, session))
    }

    fn replace<'a>(&'a self, id: &'a SessionId, data: Bytes) -> StoreFuture<'a, Landed> {
        self.measure(StoreOp::Replace, self.inner.replace(id, data))
    }

    fn patch<'a>(&'a self, id: &'a SessionId, patch: &'a Value) -> StoreFuture<'a, PatchOutcome> {
        self.measure(StoreOp::Patch, self.inner.patch(id, patch))
    }

    fn current<'a>(&'a self, id: &'a SessionId) -> StoreFuture<'a, bool> {
        self.measure(StoreOp::Check, self.inner.current(id))
    }

    fn delete<'a>(&'a self, id: &'a SessionId) -> StoreFuture<'a, Landed> {
        self.measure(StoreOp::Delete, self.inner.delete(id))
    }

    fn rotate<'a>(
        &'a self,
        old: &'a SessionId,
        new: &'a SessionId,
        grace: Duration,
    ) -> StoreFuture<'a, Rotated> {
        self.measure(StoreOp::Rotate, self.inner.rotate(old, new, grace))
    }

    fn user_sessions<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<SessionInfo>> {
        self.measure(StoreOp::UserSessions, self.inner.user_sessions(user))
    }

    fn revoke_user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, usize> {
        self.measure(StoreOp::RevokeUser, self.inner.revoke_user(user))
    }

    fn revoke_handle<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, bool> {
        self.measure(StoreOp::RevokeHandle, self.inner.revoke_handle(handle))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        self.measure(StoreOp::Ping, self.inner.ping())
    }

    fn session_count(&self) -> Option<usize> {
        self.inner.session_count()
    }
}
