//! Memory the memory store spends per session beyond the session's own data.
//!
//! Fills a `MemoryStore` with sessions of ~100 bytes of JSON through the `Store` trait,
//! made the way the proxy makes them (an `X-Session-Update` header decoded by the codec,
//! a generated ID), and compares the process's resident memory before and after; then
//! reads every session once and measures again.
//! Prints `key=value` lines that `scripts/bench.sh` reads.
//!
//! `cargo run --release --example memory_per_session -- 1000000`

use std::time::Duration;

use futures_util::FutureExt;
use session_proxy::session::codec::{self, Update};
use session_proxy::session::id::{IdShape, SessionId};
use session_proxy::store::memory::MemoryStore;
use session_proxy::store::{NewSession, Store, StoreError, StoreSettings};

/// The allocator of the `session-proxy` binary (see `src/main.rs`): its per-allocation
/// overhead is part of what is measured.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Resident memory of this process, in bytes, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Runs a memory-store future, which is always ready at once.
fn ready<T>(
    future: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, Box<dyn std::error::Error>> {
    let result = future
        .now_or_never()
        .ok_or("memory store future was not ready")?;
    Ok(result?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|n| n.replace('_', "").parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let settings = StoreSettings {
        max_age: Duration::from_secs(1_209_600),
        user_key: None,
        max_bytes: 4096,
    };
    let store = MemoryStore::new(settings, count);
    let shape = IdShape::default();
    // The caller's copies of the IDs exist before the first reading, so only the store's
    // own copies are counted.
    let ids: Vec<SessionId> = (0..count).map(|_| SessionId::generate(shape)).collect();
    let before = rss_bytes();
    let mut data_bytes = 0u64;
    for (n, id) in ids.iter().enumerate() {
        let json = format!(
            r#"{{"user_id":"u-{n:07}","roles":["reader","editor"],"cart":[17,42,99],"theme":"dark","n":{n}}}"#
        );
        let update = codec::decode_update(&codec::encode(json.as_bytes()), 4096)
            .map_err(|v| v.to_string())?;
        let Update::Replace(data) = update else {
            return Err("the session decoded as a destroy".into());
        };
        data_bytes += data.len() as u64;
        let session = NewSession {
            data,
            created: 1_700_000_000,
            ends: None,
        };
        ready(store.create(id, session))?;
    }
    let after = rss_bytes();
    // Reading a session may allocate too (e.g. a shared buffer's reference count).
    for id in &ids {
        ready(store.load(id, false))?;
    }
    let after_reads = rss_bytes();
    let held = store.session_count().unwrap_or(0);
    let per_session = |rss: u64| rss.saturating_sub(before) as f64 / count as f64;
    let data_per_session = data_bytes as f64 / count as f64;
    println!("sessions={held}");
    println!("rss_before_bytes={before}");
    println!("rss_after_bytes={after}");
    println!("rss_after_reads_bytes={after_reads}");
    println!("bytes_per_session={:.1}", per_session(after));
    println!("data_bytes_per_session={data_per_session:.1}");
    println!(
        "overhead_bytes_per_session={:.1}",
        per_session(after) - data_per_session
    );
    println!(
        "overhead_after_one_read_bytes_per_session={:.1}",
        per_session(after_reads) - data_per_session
    );
    Ok(())
}
