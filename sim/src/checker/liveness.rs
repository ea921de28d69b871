//! Liveness after healing: once every fault is healed, every partition elects a leader, accepts
//! a write, and every replica serves it, within the bound.
//!
//! Source: Raft §5.2/§9.3 (progress under eventual synchrony); the "recovery" phase of Jepsen
//! tests.

use super::Evidence;
use super::Invariant;

pub const INVARIANT: Invariant = Invariant {
    name: "liveness-after-heal",
    source: "Raft §9.3 (progress once the network is stable); Jepsen recovery phase",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    let mut problems = e.audit.liveness.clone();
    if !e.audit.done && problems.is_empty() {
        problems.push("the verifier did not finish its audit".into());
    }
    problems
}
