//! The checker: after a run, judges the client history together with the final state of every
//! replica. One invariant per file, each naming where the property comes from.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use eddy_raft::GroupId;
use eddy_raft::NodeId;
use serde::Serialize;

use crate::history::FetchObservation;
use crate::history::GroupDelivery;
use crate::history::GroupEvent;
use crate::history::PartitionKey;
use crate::history::ProduceOp;
use crate::workload::Audit;

pub mod acked_not_lost;
pub mod consumer_reads;
pub mod election_safety;
pub mod group_commits;
pub mod group_consumes_all;
pub mod intruders_refused;
pub mod liveness;
pub mod log_matching;
pub mod metadata_agreement;
pub mod no_duplicates;
pub mod no_panics;
pub mod offsets;
pub mod producer_order;

/// One replica's Raft log as the checker sees it.
#[derive(Debug, Clone, Default)]
pub struct ReplicaLog {
    pub committed: Option<u64>,
    /// (index, term, xxh3 of the payload).
    pub entries: BTreeMap<u64, (u64, u64)>,
}

/// Everything the checker judges.
#[derive(Debug, Default)]
pub struct Evidence {
    pub produces: Vec<ProduceOp>,
    pub fetches: Vec<FetchObservation>,
    /// Topics with retention: their replicas may start after offset 0.
    pub retention_topics: BTreeSet<String>,
    /// Members of the consumer group (0: the run had no group, so there is nothing to judge).
    pub group_members: u32,
    pub deliveries: Vec<GroupDelivery>,
    pub group_events: Vec<GroupEvent>,
    pub audit: Audit,
    pub leaders: BTreeMap<(GroupId, u64), BTreeSet<NodeId>>,
    pub logs: BTreeMap<GroupId, BTreeMap<NodeId, ReplicaLog>>,
    /// Node -> (last applied index, a rendering of its metadata state).
    pub metadata: BTreeMap<NodeId, (Option<u64>, String)>,
    /// What each running replica serves as committed at the end, read in-process (this works
    /// even when the cluster is not live and the verifier could not audit over the network).
    pub replica_views: BTreeMap<PartitionKey, BTreeMap<NodeId, Vec<(u64, String)>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub source: &'static str,
    pub count: usize,
    /// The first few problems found.
    pub examples: Vec<String>,
}

/// An invariant: its name, where it comes from, and the check.
pub struct Invariant {
    pub name: &'static str,
    pub source: &'static str,
    pub check: fn(&Evidence) -> Vec<String>,
}

pub const INVARIANTS: [Invariant; 13] = [
    no_panics::INVARIANT,
    acked_not_lost::INVARIANT,
    no_duplicates::INVARIANT,
    producer_order::INVARIANT,
    offsets::INVARIANT,
    consumer_reads::INVARIANT,
    log_matching::INVARIANT,
    election_safety::INVARIANT,
    metadata_agreement::INVARIANT,
    group_commits::INVARIANT,
    group_consumes_all::INVARIANT,
    liveness::INVARIANT,
    intruders_refused::INVARIANT,
];

const EXAMPLES_MAX: usize = 8;

/// The record at `offset` among a replica's records, which run densely from its log start.
pub fn record_at(records: &[(u64, String)], offset: u64) -> Option<&(u64, String)> {
    let first = records.first()?.0;
    let r = records.get(usize::try_from(offset.checked_sub(first)?).ok()?)?;
    (r.0 == offset).then_some(r)
}

/// True when `offset` lies before the first record a replica still has (retention removed it).
pub fn purged(records: &[(u64, String)], offset: u64) -> bool {
    records.first().is_some_and(|(first, _)| offset < *first)
}

/// Runs every invariant; returns the names of those that held and the violations.
pub fn check_all(e: &Evidence) -> (Vec<&'static str>, Vec<Violation>) {
    let mut held = Vec::new();
    let mut violations = Vec::new();
    for inv in &INVARIANTS {
        let problems = (inv.check)(e);
        if problems.is_empty() {
            held.push(inv.name);
        } else {
            violations.push(Violation {
                invariant: inv.name,
                source: inv.source,
                count: problems.len(),
                examples: problems.into_iter().take(EXAMPLES_MAX).collect(),
            });
        }
    }
    (held, violations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;

    fn op(payload: &str, offset: Option<u64>) -> ProduceOp {
        ProduceOp {
            client: "c".into(),
            topic: "t".into(),
            partition: 0,
            payload: payload.into(),
            invoke_ms: 0,
            complete_ms: Some(1),
            outcome: offset
                .map_or(Outcome::Unknown { error: "timeout".into() }, |o| Outcome::Ok { offset: o }),
        }
    }

    fn audit(replicas: &[(u64, &[&str])]) -> Audit {
        let mut a = Audit { done: true, ..Default::default() };
        let mut m = BTreeMap::new();
        for (node, values) in replicas {
            m.insert(*node, values.iter().enumerate().map(|(i, v)| (i as u64, v.to_string())).collect());
        }
        a.replicas.insert(("t".into(), 0), m);
        a
    }

    fn violated(e: &Evidence) -> Vec<&'static str> {
        check_all(e).1.into_iter().map(|v| v.invariant).collect()
    }

    fn delivery(offset: u64, value: &str) -> GroupDelivery {
        GroupDelivery {
            member: "m".into(),
            topic: "t".into(),
            partition: 0,
            offset,
            value: value.into(),
            at_ms: 2,
        }
    }

    fn event(commit: bool, offset: u64, at: u64) -> GroupEvent {
        let (member, partition) = ("m".to_string(), ("t".to_string(), 0));
        if commit {
            GroupEvent::Committed { member, partition, offset, invoke_ms: at - 1, complete_ms: at }
        } else {
            GroupEvent::TookOver { member, partition, start: offset, invoke_ms: at, complete_ms: at + 1 }
        }
    }

    #[test]
    fn a_consistent_run_passes() {
        let e = Evidence {
            produces: vec![op("a", Some(0)), op("b", Some(1)), op("c", None)],
            audit: audit(&[(1, &["a", "b", "c"]), (2, &["a", "b", "c"])]),
            group_members: 1,
            deliveries: vec![delivery(0, "a"), delivery(1, "b"), delivery(1, "b")],
            group_events: vec![event(true, 1, 10), event(false, 1, 20), event(true, 2, 30)],
            ..Default::default()
        };
        assert_eq!(violated(&e), Vec::<&str>::new());
    }

    #[test]
    fn group_anomalies_are_caught() {
        // An acknowledged event the group never consumed, and a takeover that went back.
        let e = Evidence {
            produces: vec![op("a", Some(0)), op("b", Some(1))],
            audit: audit(&[(1, &["a", "b"])]),
            group_members: 1,
            deliveries: vec![delivery(0, "a")],
            group_events: vec![event(true, 2, 10), event(false, 1, 20)],
            ..Default::default()
        };
        let v = violated(&e);
        assert!(v.contains(&group_consumes_all::INVARIANT.name), "{v:?}");
        assert!(v.contains(&group_commits::INVARIANT.name), "{v:?}");
        // A takeover concurrent with the commit may miss it.
        let e = Evidence {
            produces: vec![op("a", Some(0))],
            audit: audit(&[(1, &["a"])]),
            group_members: 1,
            deliveries: vec![delivery(0, "a")],
            group_events: vec![event(true, 1, 20), event(false, 0, 19)],
            ..Default::default()
        };
        assert_eq!(violated(&e), Vec::<&str>::new());
    }

    #[test]
    fn each_anomaly_is_caught_by_its_invariant() {
        // Lost write: acknowledged at 1, missing on node 2.
        let e = Evidence {
            produces: vec![op("a", Some(0)), op("b", Some(1))],
            audit: audit(&[(1, &["a", "b"]), (2, &["a"])]),
            ..Default::default()
        };
        assert!(violated(&e).contains(&acked_not_lost::INVARIANT.name));
        // Duplicate and inconsistent offsets.
        let e = Evidence {
            produces: vec![op("a", Some(0)), op("b", Some(1))],
            audit: audit(&[(1, &["a", "b", "a"]), (2, &["a", "x", "a"])]),
            ..Default::default()
        };
        let v = violated(&e);
        assert!(v.contains(&no_duplicates::INVARIANT.name), "{v:?}");
        assert!(v.contains(&offsets::INVARIANT.name), "{v:?}");
        // Reordered: "b" was sent after "a" by the same producer but written before it.
        let e = Evidence {
            produces: vec![op("a", Some(1)), op("b", Some(0))],
            audit: audit(&[(1, &["b", "a"])]),
            ..Default::default()
        };
        assert_eq!(violated(&e), vec![producer_order::INVARIANT.name]);
        // A consumer read something that is not in the final log there.
        let mut e = Evidence {
            produces: vec![op("a", Some(0))],
            audit: audit(&[(1, &["a"]), (2, &["a"])]),
            ..Default::default()
        };
        e.fetches.push(FetchObservation {
            consumer: "k".into(),
            topic: "t".into(),
            partition: 0,
            node: 2,
            requested: 0,
            at_ms: 5,
            records: vec![(0, "ghost".into())],
        });
        assert!(violated(&e).contains(&consumer_reads::INVARIANT.name));
        // Two leaders in one term.
        let mut e = Evidence { audit: audit(&[]), ..Default::default() };
        e.leaders.insert((3, 7), [1, 2].into());
        assert!(violated(&e).contains(&election_safety::INVARIANT.name));
    }
}
