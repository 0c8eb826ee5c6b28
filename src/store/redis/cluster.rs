//! Under Redis Cluster, a write waits for the replicas of the master it goes to, as under
//! Sentinel: Redis replicates asynchronously, so a master that acknowledged a write and
//! then failed may be replaced by a replica that never got it. Each write is followed, on
//! the same connection, by `WAIT` for every healthy replica the cluster lists for the
//! master of its key's hash slot, so that whichever replica is promoted holds it. A master
//! without a healthy replica (none configured, or all of them failed) has nothing that
//! could be promoted over it, so its writes go without waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{FromRedisValue, RedisError, Value};

use super::ClearOnDrop;

/// Hash slots in a Redis Cluster.
const SLOTS: usize = 16384;

/// How long what the cluster said of its replicas holds before a write asks again.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// How long what the cluster said still stands in for an answer while it cannot be asked.
const STALE_FOR: Duration = Duration::from_secs(30);

/// The hash slot of a key, as Redis Cluster computes it: CRC16 (XMODEM) of the key, or of
/// its hash tag (what the first `{…}` holds, when it holds something), modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    let crc = hashed.iter().fold(0_u16, |crc, byte| {
        (crc << 8) ^ CRC16[usize::from((crc >> 8) as u8 ^ byte)]
    });
    crc % SLOTS as u16
}

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|b| *b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|b| *b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

/// CRC16 with polynomial 0x1021 (XMODEM), a byte at a time.
const CRC16: [u16; 256] = {
    let mut table = [0_u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// How many replicas must confirm a write, per hash slot, as the cluster last said.
pub struct ClusterReplicas {
    known: Mutex<Option<Known>>,
    /// Set while one write asks the cluster: the others go on with what it said last.
    asking: AtomicBool,
    /// How long a write waits for its replicas.
    pub confirm_within: Duration,
}

struct Known {
    per_slot: Box<[u8]>,
    at: Instant,
}

impl ClusterReplicas {
    pub fn new(confirm_within: Duration) -> ClusterReplicas {
        ClusterReplicas {
            known: Mutex::new(None),
            asking: AtomicBool::new(false),
            confirm_within,
        }
    }

    /// How many replicas must confirm a write to `slot`: what the cluster said within
    /// `FRESH_FOR`, else asked now (`fresh`: asked now in any case). While another write
    /// asks, or when the cluster cannot be asked (within `confirm_within`, see `ask`),
    /// what it said within `STALE_FOR` holds; a write fails when it has not answered for
    /// that long.
    pub async fn wanted(
        &self,
        conn: &mut ClusterConnection,
        slot: u16,
        fresh: bool,
    ) -> Result<u64, RedisError> {
        let known = {
            let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            known
                .as_ref()
                .filter(|k| k.at.elapsed() < STALE_FOR)
                .map(|k| {
                    (
                        u64::from(k.per_slot[usize::from(slot)]),
                        k.at.elapsed() < FRESH_FOR,
                    )
                })
        };
        match known {
            Some((wanted, true)) if !fresh => return Ok(wanted),
            Some((wanted, _)) if self.is_asked() => return Ok(wanted),
            _ => {}
        }
        let asking = self
            .asking
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        // Cleared however this ends, even if the write that asks is dropped on the way.
        let _asked = asking.then(|| ClearOnDrop(&self.asking));
        // With nothing to fall back on (the first write after start), the write fails
        // if the cluster does not answer: it gets the longer wait.
        let within = if known.is_some() {
            self.confirm_within / 2
        } else {
            self.confirm_within
        };
        match ask(conn, within).await {
            Ok(per_slot) => {
                let wanted = u64::from(per_slot[usize::from(slot)]);
                let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
                *known = Some(Known {
                    per_slot,
                    at: Instant::now(),
                });
                Ok(wanted)
            }
            Err(e) => known.map(|(wanted, _)| wanted).ok_or(e),
        }
    }

    fn is_asked(&self) -> bool {
        self.asking.load(Ordering::Acquire)
    }
}

/// Asks the cluster for its nodes (`CLUSTER NODES`) and counts, for each slot, the
/// healthy replicas of the master that serves it (see `replicas_per_slot`). Every master
/// is asked; when they cannot all answer within `within` (one is paused, say), one node's
/// view is taken.
async fn ask(conn: &mut ClusterConnection, within: Duration) -> Result<Box<[u8]>, RedisError> {
    let nodes = redis::cmd("CLUSTER").arg("NODES").clone();
    let masters = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    let mut refused = None;
    if let Ok(Ok(answers)) =
        tokio::time::timeout(within, conn.route_command(nodes.clone(), masters)).await
    {
        // Without a response policy, a fan-out answers with each node's reply by address.
        let answers = match answers {
            Value::Map(answers) => answers,
            other => vec![(Value::Nil, other)],
        };
        let mut views = Vec::new();
        for (_, answer) in answers {
            match answer {
                Value::ServerError(e) => refused = Some(e),
                answer => views.extend(String::from_redis_value(answer).ok()),
            }
        }
        if !views.is_empty() {
            return Ok(replicas_per_slot(&views));
        }
    }
    // A refusal (an ACL without `cluster|nodes`) says so, not that it cannot be read.
    if let Some(e) = refused {
        return Err(e.into());
    }
    let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
    let answer = tokio::time::timeout(within, conn.route_command(nodes, any))
        .await
        .map_err(|_| {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "CLUSTER NODES went unanswered",
            ))
        })??;
    match answer {
        Value::ServerError(e) => Err(e.into()),
        answer => Ok(replicas_per_slot(&[String::from_redis_value(answer)?])),
    }
}

/// Counts, for each slot, the healthy replicas of its master from the nodes' answers to
/// `CLUSTER NODES`. A master's own answer is what counts for its replicas: it learns of
/// them first, and another node's view may lag behind (a replica it has not yet heard
/// of, or one only it cannot reach). Each slot then takes the fewest any answer gives:
/// a slot on the move shows as such only on its two masters.
fn replicas_per_slot(answers: &[String]) -> Box<[u8]> {
    let views: Vec<View> = answers.iter().map(|answer| View::read(answer)).collect();
    let own: HashMap<&str, u8> = views
        .iter()
        .filter_map(|view| view.me.map(|me| (me, view.replicas_of(me))))
        .collect();
    let mut fewest = vec![u8::MAX; SLOTS].into_boxed_slice();
    for view in &views {
        for (slot, count) in fewest.iter_mut().zip(view.per_slot(&own).iter()) {
            *slot = (*slot).min(*count);
        }
    }
    if views.is_empty() {
        fewest.fill(0);
    }
    fewest
}

/// One node's `CLUSTER NODES`: one line per node, `<id> <address> <flags> <master id or
/// -> <ping sent> <pong received> <epoch> <link state> <slot ranges…>`.
struct View<'a> {
    /// The answering node, when it is a master.
    me: Option<&'a str>,
    /// A replica counts for its master while no flag says it failed or is not yet known,
    /// and its link is up.
    replicas: HashMap<&'a str, u8>,
    /// The slot ranges each master serves.
    served: Vec<(&'a str, usize, usize)>,
    /// Slots on the move, and the other master: a write may run on either node.
    moving: Vec<(usize, &'a str)>,
}

impl<'a> View<'a> {
    fn read(nodes: &'a str) -> View<'a> {
        let mut view = View {
            me: None,
            replicas: HashMap::new(),
            served: Vec::new(),
            moving: Vec::new(),
        };
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            let [id, _, flags, master, _, _, _, link, ranges @ ..] = fields.as_slice() else {
                continue;
            };
            let flags: Vec<&str> = flags.split(',').collect();
            if flags.contains(&"slave") {
                let failing = flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr"));
                if !failing && *link == "connected" && *master != "-" {
                    let count = view.replicas.entry(master).or_default();
                    *count = count.saturating_add(1);
                }
            } else if flags.contains(&"master") {
                if flags.contains(&"myself") {
                    view.me = Some(id);
                }
                for range in ranges.iter() {
                    view.read_range(id, range);
                }
            }
        }
        view
    }

    fn read_range(&mut self, id: &'a str, range: &'a str) {
        // `[slot->-id]` (migrating to id) and `[slot-<-id]` (importing from id).
        if let Some(marker) = range.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            let other = marker
                .split_once("->-")
                .or_else(|| marker.split_once("-<-"));
            if let Some((slot, other)) = other
                && let Ok(slot) = slot.parse::<usize>()
                && slot < SLOTS
            {
                self.moving.push((slot, other));
            }
            return;
        }
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        if let (Ok(first), Ok(last)) = (first.parse::<usize>(), last.parse::<usize>()) {
            self.served.push((id, first, last.min(SLOTS - 1)));
        }
    }

    fn replicas_of(&self, master: &str) -> u8 {
        self.replicas.get(master).copied().unwrap_or(0)
    }

    /// The replicas each slot waits for in this view, where a master's own count (`own`)
    /// overrides what this view says of it.
    fn per_slot(&self, own: &HashMap<&str, u8>) -> Box<[u8]> {
        let count = |master: &str| {
            own.get(master)
                .copied()
                .unwrap_or_else(|| self.replicas_of(master))
        };
        let mut per_slot = vec![0_u8; SLOTS].into_boxed_slice();
        for (master, first, last) in &self.served {
            let count = count(master);
            for slot in per_slot.iter_mut().take(last + 1).skip(*first) {
                *slot = count;
            }
        }
        for (slot, other) in &self.moving {
            per_slot[*slot] = per_slot[*slot].min(count(other));
        }
        per_slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_computed_as_redis_computes_them() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(
            key_slot(b"session:7OLq4UFyxDN57sYSUqILqGxRhXdhwVrjC7PWg28-EJQ"),
            4980
        );
        assert_eq!(key_slot(b"{app}session:x"), 6805);
        assert_eq!(key_slot(b"a{}b"), 13694);
        assert_eq!(key_slot(b"foo{{bar}}zap"), 4015);
        assert_eq!(key_slot(b"x{y"), 2740);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn each_slot_wants_the_healthy_replicas_of_its_master() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922 [5461->-a3]
a3 127.0.0.1:7002@17002 master - 0 1 3 connected 10923-16383
r1 127.0.0.1:7003@17003 slave a1 0 1 1 connected
r2 127.0.0.1:7004@17004 slave a1 0 1 1 connected
r3 127.0.0.1:7005@17005 slave,fail a2 0 1 2 disconnected
r4 127.0.0.1:7006@17006 slave a3 0 1 3 disconnected
r5 127.0.0.1:7007@17007 slave,fail? a3 0 1 3 connected
";
        let per_slot = replicas_per_slot(&[nodes.into()]);
        assert_eq!(per_slot.len(), SLOTS);
        assert_eq!((per_slot[0], per_slot[5460]), (2, 2));
        assert_eq!((per_slot[5461], per_slot[10922]), (0, 0));
        let migrating =
            replicas_per_slot(&["m1 1:1@2 myself,master - 0 0 1 connected 0-9 [3->-m2]\n\
             m2 1:2@3 master - 0 0 2 connected 10-19 [3-<-m1]\n\
             r1 1:3@4 slave m1 0 0 1 connected\n"
                .into()]);
        assert_eq!((migrating[2], migrating[3], migrating[4]), (1, 0, 1));
        assert_eq!(migrating[10], 0);
        assert_eq!((per_slot[10923], per_slot[16383]), (0, 0));
        let single = replicas_per_slot(&[
            "m 1:1@2 master - 0 0 1 connected 7\nr 1:2@3 slave m 0 0 1 connected\n".into(),
        ]);
        assert_eq!((per_slot[7], single[7], single[6], single[8]), (2, 1, 0, 0));
        assert!(
            replicas_per_slot(&["garbage\n\n".into()])
                .iter()
                .all(|n| *n == 0)
        );
        assert!(replicas_per_slot(&[]).iter().all(|n| *n == 0));
    }

    /// Each master knows its own replicas first: another master that has not yet heard
    /// of one, or cannot reach it, does not take it away from the slots it confirms.
    #[test]
    fn a_master_counts_its_own_replicas() {
        let a = "\
a 1:1@2 myself,master - 0 0 1 connected 0-8191
b 1:2@3 master - 0 0 2 connected 8192-16383
ra 1:3@4 slave a 0 0 1 connected
rb 1:4@5 slave b 0 0 2 connected
";
        let b = "\
a 1:1@2 master - 0 0 1 connected 0-8191
b 1:2@3 myself,master - 0 0 2 connected 8192-16383
ra 1:3@4 master - 0 0 0 connected
rb 1:4@5 slave,fail? b 0 0 2 connected
";
        let per_slot = replicas_per_slot(&[a.into(), b.into()]);
        assert_eq!((per_slot[0], per_slot[8191]), (1, 1));
        assert_eq!((per_slot[8192], per_slot[16383]), (0, 0));
        // A replica's own view says nothing of any master's own count.
        let replica = "\
a 1:1@2 master - 0 0 1 connected 0-16383
ra 1:3@4 myself,slave a 0 0 1 connected
";
        assert_eq!(replicas_per_slot(&[replica.into()])[5], 1);
    }
}
