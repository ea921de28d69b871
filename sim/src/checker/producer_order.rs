//! Producer order: a producer's acknowledged events in one partition sit at offsets in the
//! order it sent them, though its requests may be in flight together, overtake each other, be
//! refused and sent again, or fail over to another leader.
//!
//! Source: Kafka's per-partition ordering guarantee for idempotent producers with up to five
//! requests in flight (KIP-98, KAFKA-5494); Jepsen's "reordered writes".

use std::collections::BTreeMap;

use super::Evidence;
use super::Invariant;
use crate::history::Outcome;

pub const INVARIANT: Invariant = Invariant {
    name: "producer-order",
    source: "Kafka KIP-98 / KAFKA-5494 ordering with several requests in flight; Jepsen 'reordered writes'",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    let mut problems = Vec::new();
    // The history holds produces in the order they were invoked; each client sends one at a time.
    let mut last: BTreeMap<(&str, &str, u32), (u64, &str)> = BTreeMap::new();
    for op in &e.produces {
        let Outcome::Ok { offset } = op.outcome else {
            continue;
        };
        let key = (op.client.as_str(), op.topic.as_str(), op.partition);
        if let Some((before, payload)) = last.insert(key, (offset, op.payload.as_str()))
            && before >= offset
        {
            problems.push(format!(
                "{}/{}: {} sent {payload:?} before {:?}, but they were written at offsets {before} and {offset}",
                op.topic, op.partition, op.client, op.payload
            ));
        }
    }
    problems
}
