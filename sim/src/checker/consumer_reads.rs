//! Consumers never receive uncommitted data, and never see offsets go backwards or skip: every
//! record a consumer read is the record the partition holds at that offset in the end, and
//! every fetch returns consecutive records starting at the offset asked for.
//!
//! Source: Raft §5.4.2/§8 (only committed entries are applied and served); Jepsen's "dirty
//! read" / "read uncommitted" and "non-monotonic" anomalies.

use super::Evidence;
use super::Invariant;

pub const INVARIANT: Invariant = Invariant {
    name: "consumers-read-committed-in-order",
    source: "Raft §5.4.2 and §8; Jepsen 'read uncommitted', 'non-monotonic reads'",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    let mut problems = Vec::new();
    for f in &e.fetches {
        let key = (f.topic.clone(), f.partition);
        // The final log: any replica's audited records (they agree, or offsets.rs says not).
        let final_log =
            e.audit.replicas.get(&key).and_then(|r| r.values().max_by_key(|v| v.last().map(|(o, _)| *o)));
        for (i, (offset, value)) in f.records.iter().enumerate() {
            if *offset != f.requested + i as u64 {
                problems.push(format!(
                    "{} read {}/{} from node {} at offset {} and got offset {offset} at position {i} (skip or rewind)",
                    f.consumer, f.topic, f.partition, f.node, f.requested
                ));
                break;
            }
            let Some(log) = final_log else { continue };
            if super::purged(log, *offset) {
                continue;
            }
            match super::record_at(log, *offset) {
                Some((o, v)) if *o == *offset && v == value => {}
                Some((_, v)) => problems.push(format!(
                    "{} read {value:?} at {}/{} offset {offset} from node {} at {} ms; the committed log has {v:?} there",
                    f.consumer, f.topic, f.partition, f.node, f.at_ms
                )),
                None if e.audit.done => problems.push(format!(
                    "{} read {value:?} at {}/{} offset {offset} from node {} at {} ms; the committed log ends before it",
                    f.consumer, f.topic, f.partition, f.node, f.at_ms
                )),
                None => {}
            }
        }
    }
    problems
}
