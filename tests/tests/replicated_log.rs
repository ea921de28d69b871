//! The acceptance scenario of the replicated partitioned log, on three real `eddy-node`
//! processes driven by `eddyctl`: produce to every partition, SIGKILL a partition leader and keep
//! producing, read everything back from the surviving followers, restart the killed node, then
//! SIGKILL and restart the whole cluster; no acknowledged event may be lost, moved or duplicated.
//! Finally, bad input is refused with messages that name the problem, and no node is harmed.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::ensure;
use eddy_tests::Acked;
use eddy_tests::CTL_TIMEOUT;
use eddy_tests::Cluster;
use eddy_tests::CtlOutput;
use eddy_tests::partition_info;
use eddy_tests::retry;
use eddy_tests::values;
use eddy_tests::wait_for;
use serde_json::Value;

const TOPIC: &str = "orders";
const PARTITIONS: u32 = 3;
const EVENTS: usize = 1000;

fn ctl(c: &Cluster, args: &[&str]) -> anyhow::Result<CtlOutput> {
    c.ctl(args, None, CTL_TIMEOUT)
}

fn describe(c: &Cluster) -> anyhow::Result<Value> {
    c.describe(TOPIC)
}

fn produce(c: &Cluster, p: u32, values: &[String], acked: &mut Acked) -> anyhow::Result<()> {
    c.produce(TOPIC, p, values, acked)
}

fn check_replica(c: &Cluster, p: u32, replica: u64, count: u64, acked: &Acked) -> anyhow::Result<()> {
    c.check_replica(TOPIC, p, replica, count, acked)
}

fn high_watermark(c: &Cluster, p: u32, acked: &Acked) -> anyhow::Result<u64> {
    c.high_watermark(TOPIC, p, acked)
}

#[test]
fn replicated_log_acceptance() -> anyhow::Result<()> {
    on_three_nodes(scenario)
}

/// Runs `scenario` on a new three-node cluster; prints the nodes' log tails if it fails.
fn on_three_nodes(scenario: impl FnOnce(&mut Cluster) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let result = scenario(&mut c);
    if result.is_err() {
        for id in 1..=3 {
            eprintln!("--- node {id} log tail ---\n{}", c.log_tail(id, 40));
        }
    }
    result
}

fn scenario(c: &mut Cluster) -> anyhow::Result<()> {
    // 1. All three nodes up.
    wait_for("all three nodes up", Duration::from_secs(20), || {
        let out = ctl(c, &["cluster", "status"]).ok()?;
        let v = out.json().ok()?;
        let nodes = v["nodes"].as_array()?;
        (nodes.len() == 3 && nodes.iter().all(|n| n["up"] == true)).then_some(())
    })?;

    // 2. A topic with three partitions, each with a leader and three replicas.
    let out = ctl(c, &["topic", "create", TOPIC, "--partitions", "3", "--replication-factor", "3"])?;
    ensure!(out.ok(), "topic create failed: {out:?}");
    let topic = wait_for("a leader for every partition", Duration::from_secs(30), || {
        let t = describe(c).ok()?;
        let parts = t["partitions"].as_array()?;
        let ready = parts.len() == PARTITIONS as usize
            && parts
                .iter()
                .all(|p| p["leader"].is_u64() && p["replicas"].as_array().is_some_and(|r| r.len() == 3));
        ready.then_some(t)
    })?;
    for p in 0..PARTITIONS {
        let replicas = partition_info(&topic, p)?["replicas"].as_array().context("replicas")?.clone();
        let mut ids: Vec<u64> = replicas.iter().filter_map(Value::as_u64).collect();
        ids.sort_unstable();
        ensure!(ids == vec![1, 2, 3], "partition {p} replicas {replicas:?}");
    }

    // 3. 1,000 distinct events to each partition.
    let mut acked = Acked::new();
    for p in 0..PARTITIONS {
        produce(c, p, &values(&format!("first-p{p}"), EVENTS), &mut acked)?;
    }

    // 4. SIGKILL the leader of partition 0, then produce to it again.
    let leader = partition_info(&describe(c)?, 0)?["leader"].as_u64().context("leader of partition 0")?;
    c.kill_node(leader)?;
    let killed_at = Instant::now();
    let mut attempt = 0;
    wait_for("partition 0 to accept writes after its leader died", Duration::from_secs(30), || {
        attempt += 1;
        let v = [format!("probe-{attempt}")];
        let survivors =
            c.nodes.values().filter(|n| n.is_running()).map(|n| n.client_addr.clone()).collect::<Vec<_>>();
        let input = format!("{}\n", v[0]);
        let out = eddy_tests::run_ctl(
            &survivors.join(","),
            &["--request-timeout", "2s", "produce", TOPIC, "--partition", "0"],
            Some(input.as_bytes()),
            Duration::from_secs(40),
        )
        .ok()?;
        if !out.ok() {
            return None;
        }
        let line = out.json_lines().ok()?.pop()?;
        let offset = line["offset"].as_u64()?;
        acked.entry(0).or_default().insert(offset, v[0].clone());
        Some(())
    })?;
    eprintln!(
        "partition 0 writable again {:?} after SIGKILL of its leader (node {leader})",
        killed_at.elapsed()
    );
    produce(c, 0, &values("second-p0", EVENTS), &mut acked)?;

    // 5. Every surviving follower of every partition has every acknowledged event.
    let survivors: Vec<u64> = c.nodes.values().filter(|n| n.is_running()).map(|n| n.id).collect();
    for p in 0..PARTITIONS {
        let hw = retry("the partition's leader to be known", Duration::from_secs(30), || {
            high_watermark(c, p, &acked)
        })?;
        let leader = partition_info(&describe(c)?, p)?["leader"].as_u64();
        for &r in &survivors {
            if Some(r) != leader {
                check_replica(c, p, r, hw, &acked)?;
            }
        }
    }

    // 6. The killed node, restarted on its data, catches up and serves everything.
    c.start_node(leader)?;
    for p in 0..PARTITIONS {
        let hw = retry("the partition's leader to be known", Duration::from_secs(30), || {
            high_watermark(c, p, &acked)
        })?;
        retry("the restarted node to serve every acknowledged event", Duration::from_secs(20), || {
            check_replica(c, p, leader, hw, &acked)
        })?;
    }

    // 7. SIGKILL every node, start them again: nothing acknowledged is lost or moved.
    for id in 1..=3 {
        c.kill_node(id)?;
    }
    for id in 1..=3 {
        c.start_node(id)?;
    }
    for p in 0..PARTITIONS {
        let hw = retry("the partition's leader to have applied its log", Duration::from_secs(30), || {
            high_watermark(c, p, &acked)
        })?;
        for r in 1..=3 {
            retry("every replica to serve every acknowledged event", Duration::from_secs(30), || {
                check_replica(c, p, r, hw, &acked)
            })?;
        }
    }

    // 8. Bad input: each refused with a message naming the problem; the cluster stays healthy.
    let long = "x".repeat(300);
    // (arguments, stdin, a phrase the error must contain)
    type Case<'a> = (Vec<&'a str>, Option<Vec<u8>>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["topic", "create", "a/b", "--partitions", "1", "--replication-factor", "1"], None, "'/'"),
        (vec!["topic", "create", &long, "--partitions", "1", "--replication-factor", "1"], None, "too long"),
        (
            vec!["topic", "create", "zero", "--partitions", "0", "--replication-factor", "1"],
            None,
            "partitions",
        ),
        (
            vec!["topic", "create", "wide", "--partitions", "1", "--replication-factor", "4"],
            None,
            "replication_factor",
        ),
        (vec!["consume", "missing", "--partition", "0", "--count", "1"], None, "does not exist"),
        (vec!["produce", TOPIC, "--partition", "1"], Some(vec![b'v'; 16 << 20]), "maximum event size"),
    ];
    for (args, stdin, needle) in cases {
        let out = c.ctl(&args, stdin.as_deref(), CTL_TIMEOUT)?;
        ensure!(!out.ok(), "{args:?} should fail: {out:?}");
        ensure!(out.stderr.contains(needle), "{args:?}: the error should mention {needle:?}: {}", out.stderr);
    }
    let out = ctl(c, &["cluster", "status"])?;
    let nodes = out.json()?["nodes"].as_array().cloned().unwrap_or_default();
    ensure!(nodes.len() == 3 && nodes.iter().all(|n| n["up"] == true), "a node was harmed: {nodes:?}");
    for p in 0..PARTITIONS {
        let hw = high_watermark(c, p, &acked)?;
        check_replica(c, p, 1 + u64::from(p), hw, &acked)?;
    }
    Ok(())
}

/// An idempotent producer with five requests in flight per partition keeps writing through a
/// SIGKILL of its partitions' leader and the leader's return: every event it sent is in its
/// partition exactly once, in the order it was sent, on every replica (no duplicate, no gap, no
/// reordering), though requests overtook each other and were retried across the failover.
#[test]
fn pipelined_producer_through_a_leader_failover_writes_each_event_once_in_order() -> anyhow::Result<()> {
    on_three_nodes(pipelined_scenario)
}

fn pipelined_scenario(c: &mut Cluster) -> anyhow::Result<()> {
    const PIPELINED: &str = "pipelined";
    let out = ctl(c, &["topic", "create", PIPELINED, "--partitions", "2", "--replication-factor", "3"])?;
    ensure!(out.ok(), "topic create failed: {out:?}");
    c.wait_for_leaders(PIPELINED, 3)?;
    let pipelined = ["--max-in-flight-requests", "5"];
    let producers = (0..2)
        .map(|p| {
            c.background_producer_with(
                PIPELINED,
                p,
                &format!("pipe-p{p}"),
                Duration::from_micros(200),
                &pipelined,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let progress = |producers: &[eddy_tests::BackgroundProducer], n: usize, what: &str| {
        let start: Vec<usize> = producers.iter().map(|p| p.acked()).collect();
        wait_for(what, Duration::from_secs(60), || {
            producers.iter().zip(&start).all(|(p, s)| p.acked() >= s + n).then_some(())
        })
    };
    progress(&producers, 500, "500 acknowledgements per partition")?;
    let leader =
        partition_info(&c.describe(PIPELINED)?, 0)?["leader"].as_u64().context("leader of partition 0")?;
    c.kill_node(leader)?;
    progress(&producers, 500, "500 more acknowledgements per partition after the leader died")?;
    c.start_node(leader)?;
    progress(&producers, 500, "500 more acknowledgements per partition after it returned")?;
    let mut acked = Acked::new();
    for p in producers {
        let r = p.stop(Duration::from_secs(60))?;
        r.ensure_clean()?;
        // Acknowledged in the order sent, at increasing offsets: nothing was reordered.
        for w in r.acks.windows(2) {
            ensure!(
                w[0].1 < w[1].1,
                "partition {}: events sent in order were written at offsets {} then {}",
                r.partition,
                w[0].1,
                w[1].1
            );
        }
        let peak: usize = r
            .stderr
            .split("at most ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no in-flight summary on stderr: {}", r.stderr))?;
        ensure!(peak >= 2, "partition {}: the producer never had two requests in flight", r.partition);
        eprintln!("partition {}: {} events, up to {peak} requests in flight", r.partition, r.sent.len());
        r.record(&mut acked)?;
    }
    // Every sent event was acknowledged (ensure_clean), so each replica must hold exactly them,
    // densely, each once, at its acknowledged offset.
    c.check_all_replicas(PIPELINED, &acked)?;
    // The leaders proposed batches that queued behind a busy partition together (group commit):
    // the entries carried more batches than there were entries. (Counted per entry, not against
    // produce requests: a batch that overtook an earlier one is proposed again, and on a loaded
    // machine those extra entries outnumbered the requests saved by coalescing.)
    let (mut batches, mut entries) = (0.0, 0.0);
    for id in 1..=3 {
        let (status, body) = c.http_get(id, "/metrics")?;
        ensure!(status == 200, "/metrics on node {id}: {status}");
        for line in body.lines() {
            let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            if line.starts_with("eddy_produce_entry_batches_total ") {
                batches += value();
            } else if line.starts_with("eddy_produce_entries_total ") {
                entries += value();
            }
        }
    }
    eprintln!("{batches} produce batches in {entries} Raft entries");
    ensure!(
        entries > 0.0 && entries < batches,
        "{batches} produce batches took {entries} entries: none coalesced"
    );
    Ok(())
}
