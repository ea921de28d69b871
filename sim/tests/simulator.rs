//! The simulator on short runs (debug builds are slow; `.ci/run` runs the swarms, the
//! regression seeds and the planted bugs with a release build): a seed passes and replays to the
//! identical trace.

use std::time::Duration;

use eddy_sim::run::RunOptions;

fn options(seed: u64, secs: u64) -> RunOptions {
    RunOptions {
        seed,
        nodes: 5,
        topics: 3,
        partitions: 4,
        duration: Duration::from_secs(secs),
        faults: None,
        bug: None,
        events_per_sec: 400,
        producers: 3,
        consumers: 2,
        group_members: 3,
        retention: false,
        progress: false,
    }
}

#[test]
fn a_seed_passes_and_replays_to_the_same_trace() {
    let opts = options(3, 6);
    let first = eddy_sim::run::run(&opts).expect("run");
    assert_eq!(first.verdict, "pass", "violations: {:?}", first.violations);
    assert!(first.acked_events > 1000, "the workload acknowledged only {} events", first.acked_events);
    assert!(!first.faults.is_empty(), "every seed injects some fault class");
    // The cluster runs with TLS and authentication: the workload got through as its user, and
    // the intruder's requests (no credentials, a wrong token, a reader's produce) were refused.
    assert!(
        first.intruder.get("refused").is_some_and(|n| *n > 0),
        "the intruder was refused at least once: {:?}",
        first.intruder
    );
    let second = eddy_sim::run::run(&opts).expect("run");
    assert_eq!(first.trace_hash, second.trace_hash, "the same seed must give the same trace");
    assert_eq!(first.trace.len(), second.trace.len());
    // Shorter: it only has to differ.
    let other = eddy_sim::run::run(&options(4, 2)).expect("run");
    assert_ne!(first.trace_hash, other.trace_hash, "different seeds should explore different runs");
}
