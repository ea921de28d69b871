//! Replica logs agree on every committed prefix: two replicas of a group hold the same entry
//! (term and payload) at every index both have committed, and committed entries never change.
//!
//! Source: Raft §5.3 Log Matching Property and §5.4.3 State Machine Safety.

use super::Evidence;
use super::Invariant;

pub const INVARIANT: Invariant =
    Invariant {
        name: "log-matching", source: "Raft §5.3 Log Matching; §5.4.3 State Machine Safety", check
    };

fn check(e: &Evidence) -> Vec<String> {
    let mut problems = Vec::new();
    for (group, replicas) in &e.logs {
        let nodes: Vec<_> = replicas.iter().collect();
        for (i, (a, la)) in nodes.iter().enumerate() {
            for (b, lb) in &nodes[i + 1..] {
                let upto = la.committed.min(lb.committed);
                let Some(upto) = upto else { continue };
                for (index, ea) in la.entries.range(..=upto) {
                    if let Some(eb) = lb.entries.get(index)
                        && ea != eb
                    {
                        problems.push(format!(
                            "group {group} index {index} (committed on both): node {a} has term {} payload {:016x}, node {b} has term {} payload {:016x}",
                            ea.0, ea.1, eb.0, eb.1
                        ));
                        break;
                    }
                }
            }
        }
    }
    problems
}
