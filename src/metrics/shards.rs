//! Counters and histograms that worker threads update without sharing a cache line or a
//! lock: each thread writes its own shard, and `/metrics` adds the shards up. (The
//! histograms of `prometheus-client` take a mutex on every observation, which every
//! request of every worker would otherwise queue on.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::server::current_worker;

/// One shard per CPU for the worker threads, and one for every other thread.
static SHARDS: LazyLock<usize> =
    LazyLock::new(|| std::thread::available_parallelism().map_or(1, |n| n.get()) + 1);

/// The shard of the calling thread. Workers beyond the CPU count share shards.
fn shard() -> usize {
    let shared = *SHARDS - 1;
    current_worker().map_or(shared, |w| w % shared)
}

/// Keeps each shard on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// A monotonic counter. Clones count into the same value.
#[derive(Clone)]
pub struct Counter {
    shards: Arc<[Padded<AtomicU64>]>,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            shards: (0..*SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

impl Counter {
    pub fn inc(&self) {
        self.shards[shard()].0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Counter").field(&self.get()).finish()
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Durations in buckets whose upper bounds double from 50 µs (20 of them, up to about
/// 26 s, then +Inf). Clones record into the same histogram.
#[derive(Clone)]
pub struct Histogram {
    shards: Arc<[Padded<HistogramShard>]>,
}

const BUCKETS: usize = 20;
const FIRST_BOUND_NANOS: u64 = 50_000;

/// No count of its own: the count is the sum of the buckets, so that a scrape while
/// observations land never shows a `+Inf` bucket that differs from `_count`.
#[derive(Default)]
struct HistogramShard {
    sum_nanos: AtomicU64,
    /// Observations per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; BUCKETS + 1],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            shards: (0..*SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let shard = &self.shards[shard()].0;
        shard.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        shard.buckets[bucket(nanos)].fetch_add(1, Ordering::Relaxed);
    }

    fn upper_bound(bucket: usize) -> f64 {
        (FIRST_BOUND_NANOS << bucket) as f64 / 1e9
    }
}

/// The first bucket whose upper bound is at least `nanos`.
fn bucket(nanos: u64) -> usize {
    if nanos <= FIRST_BOUND_NANOS {
        return 0;
    }
    // The smallest k with FIRST_BOUND_NANOS << k >= nanos.
    let ratio = nanos.div_ceil(FIRST_BOUND_NANOS);
    let k = (u64::BITS - (ratio - 1).leading_zeros()) as usize;
    k.min(BUCKETS)
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count: u64 = self
            .shards
            .iter()
            .flat_map(|s| &s.0.buckets)
            .map(|n| n.load(Ordering::Relaxed))
            .sum();
        f.debug_struct("Histogram").field("count", &count).finish()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut sum_nanos: u64 = 0;
        let mut buckets: Vec<(f64, u64)> = (0..BUCKETS)
            .map(|b| (Histogram::upper_bound(b), 0))
            .chain(std::iter::once((f64::INFINITY, 0)))
            .collect();
        for shard in self.shards.iter() {
            sum_nanos = sum_nanos.saturating_add(shard.0.sum_nanos.load(Ordering::Relaxed));
            for (total, n) in buckets.iter_mut().zip(&shard.0.buckets) {
                total.1 += n.load(Ordering::Relaxed);
            }
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<NoLabelSet>(sum_nanos as f64 / 1e9, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(50_000), 0);
        assert_eq!(bucket(50_001), 1);
        assert_eq!(bucket(100_000), 1);
        assert_eq!(bucket(100_001), 2);
        assert_eq!(bucket(FIRST_BOUND_NANOS << 19), 19);
        assert_eq!(bucket((FIRST_BOUND_NANOS << 19) + 1), 20, "+Inf");
        assert_eq!(bucket(u64::MAX), 20);
        for b in 0..BUCKETS {
            let bound = FIRST_BOUND_NANOS << b;
            assert_eq!(bucket(bound), b);
            assert_eq!(Histogram::upper_bound(b), bound as f64 / 1e9);
        }
    }

    #[test]
    fn a_scrape_while_observations_land_shows_a_count_equal_to_the_inf_bucket() {
        use prometheus_client::registry::Registry;
        use std::sync::atomic::AtomicBool;
        let histogram = Histogram::default();
        let mut registry = Registry::default();
        registry.register("took", "Time taken", histogram.clone());
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    histogram.observe(Duration::from_micros(70));
                }
            });
            let mut differing = Vec::new();
            for _ in 0..2000 {
                let mut out = String::new();
                prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
                let value = |prefix: &str| {
                    let line = out.lines().find(|l| l.starts_with(prefix)).unwrap();
                    line.rsplit(' ').next().unwrap().to_string()
                };
                let (count, inf) = (value("took_count"), value("took_bucket{le=\"+Inf\"}"));
                if count != inf {
                    differing.push((count, inf));
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert_eq!(differing, [], "_count and +Inf differed");
        });
    }

    #[test]
    fn shards_add_up() {
        let counter = Counter::default();
        let histogram = Histogram::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        counter.inc();
                        histogram.observe(Duration::from_micros(70));
                    }
                });
            }
        });
        assert_eq!(counter.get(), 4000);
        let shard_totals: u64 = histogram
            .shards
            .iter()
            .map(|s| s.0.buckets[1].load(Ordering::Relaxed))
            .sum();
        assert_eq!(shard_totals, 4000);
    }
}
