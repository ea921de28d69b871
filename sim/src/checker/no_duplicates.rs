//! No duplicates: each payload (sent once, by an idempotent producer that retries) appears at
//! most once in its partition.
//!
//! Source: idempotent producers (Kafka KIP-98) and Jepsen's "duplicated writes" anomaly.

use std::collections::BTreeMap;

use super::Evidence;
use super::Invariant;

pub const INVARIANT: Invariant = Invariant {
    name: "no-duplicates",
    source: "Kafka KIP-98 idempotent producer; Jepsen 'duplicated writes'",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    let mut problems = Vec::new();
    for ((topic, partition), replicas) in &e.audit.replicas {
        for (node, records) in replicas {
            let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
            for (offset, value) in records {
                if let Some(first) = seen.insert(value.as_str(), *offset) {
                    problems.push(format!(
                        "{topic}/{partition} on node {node}: {value:?} at offsets {first} and {offset}"
                    ));
                }
            }
        }
    }
    problems
}
