//! Intruders refused: a request with no credentials, with a wrong token, or from a user whose
//! bindings do not allow it is never served, by any node, at any point of the chaos (a node
//! that has not yet applied the bindings knows none, and refuses by default).
//!
//! Source: Kafka's authorizer contract (KIP-11: authenticate every request, deny unless a
//! binding allows); Eddy's issue 11.

use super::Evidence;
use super::Invariant;
use crate::workload::ProbeOutcome;

pub const INVARIANT: Invariant = Invariant {
    name: "intruders-refused",
    source: "Kafka KIP-11 authorizer: authenticate every request, deny unless a binding allows",
    check,
};

fn check(e: &Evidence) -> Vec<String> {
    e.audit
        .probes
        .iter()
        .filter_map(|p| match &p.outcome {
            ProbeOutcome::Served(what) | ProbeOutcome::Passed(what) => {
                Some(format!("{} ms: {}'s request got through: {what}", p.at_ms, p.who))
            }
            ProbeOutcome::Refused | ProbeOutcome::Unavailable(_) => None,
        })
        .collect()
}
