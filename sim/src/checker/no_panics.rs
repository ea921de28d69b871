//! No panics: the nodes never crash on their own. An assertion that fires is a bug found,
//! whatever the other invariants say. A panic ends the run at once (see
//! `run::report_panics`), so this invariant is reported there rather than checked here.
//!
//! Source: TigerBeetle's TIGER_STYLE ("assertions downgrade catastrophic correctness bugs into
//! liveness bugs"); a simulator must treat every crash it did not inject as a finding.

use super::Invariant;

pub const INVARIANT: Invariant = Invariant {
    name: "no-panics",
    source: "TigerBeetle TIGER_STYLE: a failed assertion is a bug found",
    check: |_| Vec::new(),
};
