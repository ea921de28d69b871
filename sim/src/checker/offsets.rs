//! Offsets are unique, dense and monotonic per partition: every replica numbers its records
//! 0, 1, 2, … without gaps, replicas agree on what is at each offset, and no two acknowledged
//! events share an offset.
//!
//! Source: Jepsen's "inconsistent offsets" (two payloads at one offset) from its Kafka and
//! Redpanda analyses; Raft §5.3 Log Matching for agreement between replicas.

use std::collections::BTreeMap;

use super::Evidence;
use super::Invariant;
use crate::history::Outcome;

pub const INVARIANT: Invariant = Invariant {
    name: "offsets-unique-dense-monotonic",
    source: "Jepsen 'inconsistent offsets'; Raft §5.3 Log Matching",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    let mut problems = Vec::new();
    for ((topic, partition), replicas) in &e.audit.replicas {
        let mut at: BTreeMap<u64, (u64, &str)> = BTreeMap::new();
        for (node, records) in replicas {
            let first = records.first().map_or(0, |(o, _)| *o);
            if first > 0 && !e.retention_topics.contains(topic) {
                problems.push(format!(
                    "{topic}/{partition} on node {node} starts at offset {first}, not 0, though nothing in it is old or big enough for its retention (if any) to remove"
                ));
            }
            for (i, (offset, value)) in records.iter().enumerate() {
                if *offset != first + i as u64 {
                    problems.push(format!(
                        "{topic}/{partition} on node {node}: offset {offset} at position {i} (not dense)"
                    ));
                    break;
                }
                match at.get(offset) {
                    Some((other, v)) if *v != value.as_str() => problems.push(format!(
                        "{topic}/{partition} offset {offset}: node {other} has {v:?}, node {node} has {value:?}"
                    )),
                    Some(_) => {}
                    None => {
                        at.insert(*offset, (*node, value.as_str()));
                    }
                }
            }
        }
    }
    let mut acked: BTreeMap<(&str, u32, u64), &str> = BTreeMap::new();
    for op in &e.produces {
        if let Outcome::Ok { offset } = op.outcome
            && let Some(other) = acked.insert((op.topic.as_str(), op.partition, offset), op.payload.as_str())
        {
            problems.push(format!(
                "{}/{} offset {offset} acknowledged for both {other:?} and {:?}",
                op.topic, op.partition, op.payload
            ));
        }
    }
    problems
}
