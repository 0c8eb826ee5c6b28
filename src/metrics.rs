//! Prometheus metrics, served as text on the admin port's `/metrics`.

mod shards;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as RareCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::store::Store;
use shards::{Counter, Histogram};

/// What a request did with its session; a label of `session_proxy_requests_total` and a
/// field of the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A session route without a session, or one whose cookie was stale.
    None,
    /// The session was read (and maybe renewed or rotated) but not changed.
    Read,
    Created,
    Updated,
    Destroyed,
    /// The path is excluded: no session at all.
    Excluded,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::None,
        Outcome::Read,
        Outcome::Created,
        Outcome::Updated,
        Outcome::Destroyed,
        Outcome::Excluded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::None => "none",
            Outcome::Read => "read",
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Destroyed => "destroyed",
            Outcome::Excluded => "excluded",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    status: &'static str,
    session: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    op: &'static str,
    kind: &'static str,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The store operations `Metered` reports, each the `op` label of its series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    Load,
    LoadRenew,
    /// Whether a session's cookie may be sent again (`Store::current`).
    Check,
    Create,
    Replace,
    Patch,
    Delete,
    Rotate,
    UserSessions,
    RevokeUser,
    RevokeHandle,
    Ping,
}

impl StoreOp {
    const COUNT: usize = StoreOp::Ping as usize + 1;

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Load => "load",
            StoreOp::LoadRenew => "load_renew",
            StoreOp::Check => "check",
            StoreOp::Create => "create",
            StoreOp::Replace => "replace",
            StoreOp::Patch => "patch",
            StoreOp::Delete => "delete",
            StoreOp::Rotate => "rotate",
            StoreOp::UserSessions => "user_sessions",
            StoreOp::RevokeUser => "revoke_user",
            StoreOp::RevokeHandle => "revoke_handle",
            StoreOp::Ping => "ping",
        }
    }
}

/// Every metric the proxy keeps, registered once at start-up.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// The counters of `requests`, by status class and outcome, looked up once: the
    /// hot path indexes this table instead of hashing labels.
    request_counters: Vec<Vec<Counter>>,
    request_duration: Histogram,
    upstream_duration: Histogram,
    store_ops: Family<OpLabels, Counter>,
    store_errors: Family<ErrorLabels, RareCounter>,
    store_duration: Family<OpLabels, Histogram>,
    /// The series of `store_ops` and `store_duration` for each `StoreOp`, looked up
    /// once, on first use.
    store_series: [OnceLock<(Counter, Histogram)>; StoreOp::COUNT],
    protocol_violations: RareCounter,
    active_sessions: Gauge,
    tunnels_open: Gauge,
    connections_open: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(true)
    }
}

impl Metrics {
    /// `counts_sessions`: the store knows how many sessions it holds (the memory store);
    /// else `active_sessions` is left out rather than shown as 0.
    pub fn new(counts_sessions: bool) -> Metrics {
        let mut registry = Registry::with_prefix("session_proxy");
        let m = Metrics {
            requests: Family::default(),
            request_counters: Vec::new(),
            request_duration: Histogram::default(),
            upstream_duration: Histogram::default(),
            store_ops: Family::default(),
            store_errors: Family::default(),
            store_duration: Family::default(),
            store_series: Default::default(),
            protocol_violations: RareCounter::default(),
            active_sessions: Gauge::default(),
            tunnels_open: Gauge::default(),
            connections_open: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by status class and session outcome",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time the application took to send its response head",
            m.upstream_duration.clone(),
        );
        registry.register(
            "store_operations",
            "Session store operations, by operation",
            m.store_ops.clone(),
        );
        registry.register(
            "store_errors",
            "Failed session store operations, by operation and kind",
            m.store_errors.clone(),
        );
        registry.register(
            "store_operation_duration_seconds",
            "Session store latency, by operation",
            m.store_duration.clone(),
        );
        registry.register(
            "protocol_violations",
            "Responses whose session headers the proxy refused (answered 502)",
            m.protocol_violations.clone(),
        );
        if counts_sessions {
            registry.register(
                "active_sessions",
                "Sessions held by the memory store (absent for Redis)",
                m.active_sessions.clone(),
            );
        }
        registry.register(
            "websocket_tunnels_open",
            "WebSocket tunnels open",
            m.tunnels_open.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open",
            m.connections_open.clone(),
        );
        let request_counters = STATUS_CLASSES
            .iter()
            .map(|status| {
                Outcome::ALL
                    .iter()
                    .map(|outcome| {
                        m.requests.get_or_create_owned(&RequestLabels {
                            status,
                            session: outcome.as_str(),
                        })
                    })
                    .collect()
            })
            .collect();
        Metrics {
            registry,
            request_counters,
            ..m
        }
    }

    pub fn request(&self, status: http::StatusCode, outcome: Outcome, took: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        let column = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        if let Some(counter) = self
            .request_counters
            .get(class)
            .and_then(|row| row.get(column))
        {
            counter.inc();
        }
        self.request_duration.observe(took);
    }

    pub fn upstream(&self, took: Duration) {
        self.upstream_duration.observe(took);
    }

    pub fn store_op(&self, op: StoreOp, took: Duration, error: Option<&'static str>) {
        let (count, duration) = self.store_series[op as usize].get_or_init(|| {
            let labels = OpLabels { op: op.as_str() };
            (
                self.store_ops.get_or_create_owned(&labels),
                self.store_duration.get_or_create_owned(&labels),
            )
        });
        count.inc();
        duration.observe(took);
        if let Some(kind) = error {
            self.store_errors
                .get_or_create(&ErrorLabels {
                    op: op.as_str(),
                    kind,
                })
                .inc();
        }
    }

    pub fn protocol_violation(&self) {
        self.protocol_violations.inc();
    }

    pub fn tunnels(&self) -> &Gauge {
        &self.tunnels_open
    }

    pub fn connections(&self) -> &Gauge {
        &self.connections_open
    }

    /// The metrics in Prometheus text format.
    /// The metrics in OpenMetrics text (`open_metrics`), else in Prometheus's text format
    /// 0.0.4, which scrapers that do not ask for OpenMetrics read.
    pub fn render_as(&self, store: &Arc<dyn Store>, open_metrics: bool) -> String {
        let text = self.render(store);
        if open_metrics {
            text
        } else {
            prometheus_text(&text)
        }
    }

    pub fn render(&self, store: &Arc<dyn Store>) -> String {
        if let Some(n) = store.session_count() {
            self.active_sessions
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// OpenMetrics text as Prometheus's text format 0.0.4: a counter's family takes the name
/// of its samples (`…_total`), and the lines 0.0.4 does not have (`# UNIT`, `# EOF`) go.
fn prometheus_text(open_metrics: &str) -> String {
    let counters: Vec<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let family = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let name = rest.split(' ').next()?;
            counters
                .contains(&name)
                .then_some((*p, name, &rest[name.len()..]))
        });
        match family {
            Some((prefix, name, rest)) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod format_tests {
    use super::prometheus_text;

    #[test]
    fn counters_are_named_by_their_samples_in_the_prometheus_format() {
        let open = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
                    a_requests_total{k=\"v\"} 3\n# HELP a_open Open.\n# TYPE a_open gauge\n\
                    # UNIT a_open connections\na_open 1\n# EOF\n";
        assert_eq!(
            prometheus_text(open),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{k=\"v\"} 3\n# HELP a_open Open.\n# TYPE a_open gauge\na_open 1\n"
        );
    }
}
