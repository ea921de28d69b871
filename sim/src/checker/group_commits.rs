//! Committed offsets never go backwards: a member that takes a partition over starts at or after
//! every offset the group had committed (and had acknowledged) for it before the takeover
//! began. The workload never resets offsets, so there is no exception.
//!
//! Source: Kafka's consumer-group contract (a committed offset is where the next owner resumes;
//! KIP-848 fencing by member epoch) and Jepsen's "stale read" anomaly: the takeover reads the
//! commits linearizably.

use std::collections::BTreeMap;

use super::Evidence;
use super::Invariant;
use crate::history::GroupEvent;
use crate::history::PartitionKey;

pub const INVARIANT: Invariant = Invariant {
    name: "group-commits-never-go-back",
    source: "Kafka consumer-group offset contract, KIP-848 fencing; Jepsen 'stale read'",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    // Per partition, acknowledged commits as (acknowledged at, offset, member).
    let mut commits: BTreeMap<&PartitionKey, Vec<(u64, u64, &str)>> = BTreeMap::new();
    for ev in &e.group_events {
        if let GroupEvent::Committed { member, partition, offset, complete_ms, .. } = ev {
            commits.entry(partition).or_default().push((*complete_ms, *offset, member));
        }
    }
    let mut problems = Vec::new();
    for ev in &e.group_events {
        let GroupEvent::TookOver { member, partition, start, invoke_ms, .. } = ev else { continue };
        let Some(done) = commits.get(partition) else { continue };
        let before = done.iter().filter(|(at, _, _)| at < invoke_ms).max_by_key(|(_, o, _)| *o);
        if let Some((at, offset, by)) = before
            && start < offset
        {
            problems.push(format!(
                "{member} took {}/{} over at {invoke_ms} ms starting at offset {start}, but {by} had committed {offset} (acknowledged at {at} ms)",
                partition.0, partition.1
            ));
        }
    }
    problems
}
