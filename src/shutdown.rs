//! Graceful shutdown: the states a draining proxy passes through, shared by the
//! listener, every connection, the WebSocket tunnels and `/readyz`.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The shutdown sequence: `draining` (readiness fails, listener still accepts) →
/// `closing` (listener stopped, connections asked to finish) → tunnels cut when the
/// shutdown timeout runs out.
///
/// WebSocket tunnels leave hyper's connection tracking at the upgrade, so they are
/// tracked here.
#[derive(Default)]
pub struct Shutdown {
    draining: CancellationToken,
    closing: CancellationToken,
    tunnels: TaskTracker,
    cut_tunnels: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A signal arrived: readiness turns 503 at once.
    pub fn begin_drain(&self) {
        self.draining.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub async fn drained(&self) {
        self.draining.cancelled().await
    }

    /// The drain delay is over: stop accepting, ask connections to finish.
    pub fn close(&self) {
        self.closing.cancel();
    }

    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    pub fn tunnels(&self) -> &TaskTracker {
        &self.tunnels
    }

    pub fn tunnels_cancelled(&self) -> CancellationToken {
        self.cut_tunnels.clone()
    }

    /// Waits until every tunnel has closed.
    pub async fn tunnels_closed(&self) {
        self.tunnels.close();
        self.tunnels.wait().await
    }

    /// The shutdown timeout ran out: cut the tunnels still open.
    pub fn cut_tunnels(&self) {
        self.cut_tunnels.cancel();
    }
}
