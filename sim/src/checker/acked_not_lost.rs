//! No acknowledged event is lost: after healing, every acknowledged (partition, offset) holds
//! its payload on every replica (unless retention removed it: it lies before the replica's log
//! start, which the offsets invariant only allows for topics with retention). And whatever happened to liveness, no replica ever serves a
//! different record (or none) at an acknowledged offset below its own high watermark.
//!
//! Source: Raft §5.4 (Leader Completeness: a committed entry is in the log of every later
//! leader) and Jepsen's "lost writes" anomaly.

use super::Evidence;
use super::Invariant;
use super::purged;
use super::record_at;
use crate::history::Outcome;

pub const INVARIANT: Invariant = Invariant {
    name: "acked-not-lost",
    source: "Raft §5.4 Leader Completeness; Jepsen 'lost writes'",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    let mut problems = Vec::new();
    for op in &e.produces {
        let Outcome::Ok { offset } = op.outcome else {
            continue;
        };
        let key = (op.topic.clone(), op.partition);
        let Some(replicas) = e.audit.replicas.get(&key) else {
            // Not audited: the liveness invariant reports why.
            continue;
        };
        for (node, records) in replicas {
            if purged(records, offset) {
                continue;
            }
            let found = record_at(records, offset).map(|(_, v)| v.as_str());
            if found != Some(op.payload.as_str()) {
                problems.push(format!(
                    "{}/{} offset {offset}: acknowledged {:?} (by {} at {} ms), node {node} has {found:?}",
                    op.topic,
                    op.partition,
                    op.payload,
                    op.client,
                    op.complete_ms.unwrap_or(0)
                ));
            }
        }
    }
    for op in &e.produces {
        let Outcome::Ok { offset } = op.outcome else {
            continue;
        };
        let key = (op.topic.clone(), op.partition);
        for (node, records) in e.replica_views.get(&key).into_iter().flatten() {
            let hw = records.first().map_or(0, |(first, _)| first + records.len() as u64);
            if offset < hw
                && !purged(records, offset)
                && record_at(records, offset).map(|(_, v)| v.as_str()) != Some(op.payload.as_str())
            {
                problems.push(format!(
                    "{}/{} offset {offset}: acknowledged {:?}, but node {node} serves {:?} there as committed",
                    op.topic,
                    op.partition,
                    op.payload,
                    record_at(records, offset).map(|(_, v)| v)
                ));
            }
        }
    }
    problems
}
