//! Every acknowledged event is consumed by the consumer group at least once, despite member
//! crashes and rebalances, with the payload it was acknowledged with.
//!
//! Source: at-least-once delivery of Kafka consumer groups (commit after processing; a new
//! owner resumes from the last commit); Jepsen's "lost writes" seen from the consumer side.

use std::collections::BTreeMap;

use super::Evidence;
use super::Invariant;
use crate::history::Outcome;

pub const INVARIANT: Invariant = Invariant {
    name: "group-consumes-every-acked-event",
    source: "Kafka consumer-group at-least-once delivery; Jepsen 'lost writes'",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    if !e.audit.done || e.group_members == 0 {
        // The cluster was not live after healing (the liveness invariant reports that), or the
        // run had no consumer group.
        return Vec::new();
    }
    let mut delivered: BTreeMap<(&str, u32, u64), &str> = BTreeMap::new();
    let mut problems = Vec::new();
    for d in &e.deliveries {
        if let Some(prev) = delivered.insert((&d.topic, d.partition, d.offset), &d.value)
            && prev != d.value
        {
            problems.push(format!(
                "{}/{} offset {} delivered as {prev:?} and as {:?} ({})",
                d.topic, d.partition, d.offset, d.value, d.member
            ));
        }
    }
    for op in &e.produces {
        let Outcome::Ok { offset } = op.outcome else { continue };
        // Removed by retention from every replica before the group read it: gone, as in Kafka.
        let log_start = e
            .audit
            .replicas
            .get(&(op.topic.clone(), op.partition))
            .and_then(|r| r.values().filter_map(|recs| recs.first().map(|(o, _)| *o)).min())
            .unwrap_or(0);
        if offset < log_start && !delivered.contains_key(&(op.topic.as_str(), op.partition, offset)) {
            continue;
        }
        match delivered.get(&(op.topic.as_str(), op.partition, offset)) {
            Some(v) if *v == op.payload => {}
            Some(v) => problems.push(format!(
                "{}/{} offset {offset} was acknowledged as {:?} but the group consumed {v:?}",
                op.topic, op.partition, op.payload
            )),
            None => problems.push(format!(
                "{}/{} offset {offset} ({:?}, acknowledged at {:?} ms) was never consumed by the group",
                op.topic, op.partition, op.payload, op.complete_ms
            )),
        }
    }
    problems
}
