//! All nodes agree on metadata: nodes that have applied the metadata log to the same index hold
//! identical metadata (topics, placement, nodes, id counters).
//!
//! Source: Raft §5.4.3 State Machine Safety (same log prefix, same state), applied to the
//! metadata group.

use std::collections::BTreeMap;

use super::Evidence;
use super::Invariant;

pub const INVARIANT: Invariant = Invariant {
    name: "metadata-agreement",
    source: "Raft §5.4.3 State Machine Safety (metadata group)",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    let mut by_index: BTreeMap<Option<u64>, Vec<(u64, &str)>> = BTreeMap::new();
    for (node, (applied, state)) in &e.metadata {
        by_index.entry(*applied).or_default().push((*node, state.as_str()));
    }
    let mut problems = Vec::new();
    for (index, states) in by_index {
        if let Some((first_node, first)) = states.first() {
            for (node, state) in &states[1..] {
                if state != first {
                    problems.push(format!(
                        "nodes {first_node} and {node} both applied metadata up to {index:?} but differ"
                    ));
                }
            }
        }
    }
    problems
}
