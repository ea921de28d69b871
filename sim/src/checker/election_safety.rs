//! At most one leader per term per group.
//!
//! Source: Raft §5.2 Election Safety (Figure 3).

use super::Evidence;
use super::Invariant;

pub const INVARIANT: Invariant =
    Invariant { name: "election-safety", source: "Raft §5.2 Election Safety (Figure 3)", check };

fn check(e: &Evidence) -> Vec<String> {
    e.leaders
        .iter()
        .filter(|(_, nodes)| nodes.len() > 1)
        .map(|((group, term), nodes)| format!("group {group} term {term} had leaders {nodes:?}"))
        .collect()
}
