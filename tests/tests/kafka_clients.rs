//! Real Kafka clients from PyPI (confluent-kafka, i.e. librdkafka, and kafka-python) against a
//! 3-node cluster, in a virtualenv under `target/` that the test makes itself (it fails, saying
//! why, when it cannot). The clients' side is `tests/python/kafka_clients.py`; this side starts
//! them, SIGKILLs nodes and members by their handles, and checks what they wrote down.
//!
//! - An AdminClient creates a 6-partition topic with 3 replicas; an idempotent producer
//!   (acks=all) writes 100,000 events while the leader of a partition is SIGKILLed; afterwards
//!   no partition has a duplicate or a gap and every acknowledged event is where it was
//!   acknowledged.
//! - Consumer groups: three confluent-kafka members and a kafka-python member (range), and a
//!   second group of cooperative-sticky members, read a topic; a partition is never owned by two
//!   members at once, every event is consumed, a SIGKILLed member's partitions move to the
//!   others, and `eddyctl group describe` shows the group's lag reaching 0.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use anyhow::ensure;
use eddy_tests::CTL_TIMEOUT;
use eddy_tests::Cluster;
use eddy_tests::wait_for;
use serde_json::Value;

const TOPIC: &str = "orders";

fn python() -> anyhow::Result<PathBuf> {
    eddy_tests::kafka_python()
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kafka_clients.py")
}

/// Runs a client subcommand to completion (bounded); its stdout.
fn run(py: &Path, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
    let mut child = spawn(py, args, None)?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            let out = child.wait_with_output()?;
            ensure!(
                status.success(),
                "{args:?} failed ({status}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return Ok(String::from_utf8(out.stdout)?);
        }
        if std::time::Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            anyhow::bail!("{args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(py: &Path, args: &[&str], stderr_to: Option<&Path>) -> anyhow::Result<Child> {
    let stderr = match stderr_to {
        Some(p) => Stdio::from(std::fs::File::create(p)?),
        None => Stdio::piped(),
    };
    Command::new(py)
        .arg(script())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("start {args:?}"))
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Children killed when dropped, so a failing test leaves none behind.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn with_cluster(scenario: impl FnOnce(&mut Cluster, &Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let py = python()?;
    let mut c = Cluster::start(3)?;
    let result = c.wait_for_kafka().and_then(|()| scenario(&mut c, &py));
    if result.is_err() {
        for id in c.nodes.keys().copied().collect::<Vec<_>>() {
            eprintln!("--- node {id} log tail ---\n{}", c.log_tail(id, 40));
        }
    }
    result
}

#[test]
fn idempotent_producer_loses_and_duplicates_nothing_when_a_leader_is_killed() -> anyhow::Result<()> {
    with_cluster(|c, py| {
        let b = c.kafka_bootstrap();
        run(py, &["create-topic", &b, TOPIC, "6", "3"], Duration::from_secs(90))?;
        let t = c.wait_for_leaders(TOPIC, 3)?;
        let victim = t["partitions"][0]["leader"].as_u64().context("leader of partition 0")?;
        const EVENTS: usize = 100_000;
        let acked_path = c.dir.path().join("acked.jsonl");
        let producer_log = c.dir.path().join("producer.log");
        let events = EVENTS.to_string();
        let mut children = Children(vec![spawn(
            py,
            &["produce", &b, TOPIC, &events, acked_path.to_str().context("path")?],
            Some(&producer_log),
        )?]);
        wait_for("30,000 events acknowledged", Duration::from_secs(120), || {
            (lines(&acked_path).len() >= 30_000).then_some(())
        })?;
        c.kill_node(victim)?;
        let producer = children.0.remove(0);
        let out = wait_with_deadline(producer, Duration::from_secs(240))?;
        ensure!(
            out.0,
            "the producer failed: {}\n{}",
            out.1,
            std::fs::read_to_string(&producer_log).unwrap_or_default()
        );
        let acked = lines(&acked_path);
        ensure!(acked.len() == EVENTS, "{} of {EVENTS} acknowledged", acked.len());

        // Everything, read back from the two nodes left.
        let read_path = c.dir.path().join("read.jsonl");
        let alive: Vec<String> =
            c.nodes.values().filter(|n| n.id != victim).map(|n| n.kafka_addr.clone()).collect();
        run(
            py,
            &["read-all", &alive.join(","), TOPIC, "6", read_path.to_str().context("path")?, "5"],
            Duration::from_secs(180),
        )?;
        let read = lines(&read_path);
        let mut by_partition: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
        for r in &read {
            by_partition
                .entry(r["p"].as_u64().context("p")?)
                .or_default()
                .push((r["o"].as_u64().context("o")?, r["v"].as_str().context("v")?.to_owned()));
        }
        let mut values = BTreeSet::new();
        for (p, events) in &by_partition {
            for (i, (o, v)) in events.iter().enumerate() {
                ensure!(*o == i as u64, "partition {p}: offset {o} at position {i} (a gap or a reordering)");
                ensure!(values.insert(v.clone()), "partition {p}: {v} is a duplicate");
            }
        }
        for a in &acked {
            let (p, o, v) =
                (a["p"].as_u64().context("p")?, a["o"].as_u64().context("o")?, a["v"].as_str().context("v")?);
            let stored = by_partition.get(&p).and_then(|e| e.get(o as usize));
            ensure!(stored.is_some_and(|(_, sv)| sv == v), "acknowledged {v} at {p}/{o}, found {stored:?}");
        }
        ensure!(read.len() == EVENTS, "read {} events, {EVENTS} produced", read.len());
        Ok(())
    })
}

#[test]
fn a_consumer_in_a_followers_rack_reads_through_leadership_transfers_without_a_reset() -> anyhow::Result<()> {
    with_cluster(|c, py| {
        let b = c.kafka_bootstrap();
        let out = c.ctl(
            &["topic", "create", "racked", "--partitions", "1", "--replication-factor", "3"],
            None,
            CTL_TIMEOUT,
        )?;
        ensure!(out.ok(), "create: {}", out.stderr);
        let t = c.wait_for_leaders("racked", 3)?;
        let leader = t["partitions"][0]["leader"].as_u64().context("leader")?;
        let follower = c.nodes.keys().copied().find(|n| *n != leader).context("a follower")?;
        const EVENTS: usize = 20_000;
        let dir = c.dir.path().to_path_buf();
        let (acked_path, read_path) = (dir.join("acked.jsonl"), dir.join("read.jsonl"));
        let events = EVENTS.to_string();
        let mut children = Children(vec![
            spawn(
                py,
                &[
                    "follow",
                    &b,
                    "racked",
                    eddy_tests::rack(follower),
                    &events,
                    read_path.to_str().context("path")?,
                ],
                Some(&dir.join("follow.err")),
            )?,
            spawn(
                py,
                &["produce", &b, "racked", &events, acked_path.to_str().context("path")?, "0", "4000"],
                Some(&dir.join("produce.err")),
            )?,
        ]);
        // The producer writes 4,000 events/s (5 s), so the leadership moves while it reads:
        // to each other node and back.
        let mut to = leader;
        for step in 0..3 {
            let want = (step + 1) * EVENTS / 5;
            wait_for(&format!("{want} events read"), Duration::from_secs(120), || {
                (lines(&read_path).len() >= want).then_some(())
            })?;
            to = c.nodes.keys().copied().find(|n| *n != to).context("another node")?;
            let out = c.ctl(
                &["partition", "transfer-leadership", "racked/0", "--to", &to.to_string()],
                None,
                CTL_TIMEOUT,
            )?;
            ensure!(out.ok(), "transfer to {to}: {}", out.stderr);
        }
        let producer = children.0.pop().context("producer")?;
        let (ok, out) = wait_with_deadline(producer, Duration::from_secs(180))?;
        ensure!(
            ok,
            "producer: {out}\n{}",
            std::fs::read_to_string(dir.join("produce.err")).unwrap_or_default()
        );
        let follow = children.0.pop().context("follower")?;
        let (ok, out) = wait_with_deadline(follow, Duration::from_secs(240))?;
        ensure!(
            ok,
            "the consumer failed (an offset reset is a failure): {out}\n{}",
            std::fs::read_to_string(dir.join("follow.err")).unwrap_or_default()
        );
        // Every event once, in offset order, as acknowledged: no reset went back or skipped.
        let acked: BTreeMap<u64, String> = lines(&acked_path)
            .iter()
            .filter_map(|a| Some((a["o"].as_u64()?, a["v"].as_str()?.to_owned())))
            .collect();
        let read = lines(&read_path);
        ensure!(
            read.len() == EVENTS && acked.len() == EVENTS,
            "read {}, acknowledged {}",
            read.len(),
            acked.len()
        );
        for (i, r) in read.iter().enumerate() {
            ensure!(r["o"] == i, "position {i}: offset {}", r["o"]);
            ensure!(
                acked.get(&(i as u64)).is_some_and(|v| r["v"] == v.as_str()),
                "offset {i}: {} vs {:?}",
                r["v"],
                acked.get(&(i as u64))
            );
        }
        // The node in the consumer's rack served it (all of it while it was a follower).
        let (status, body) = c.http_get(follower, "/metrics")?;
        ensure!(status == 200);
        let served: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix("eddy_kafka_fetch_records_total "))
            .context("eddy_kafka_fetch_records_total")?
            .parse()?;
        ensure!(served > 0.0, "node {follower} in rack {} served no records", eddy_tests::rack(follower));
        ensure!(
            lines(&acked_path).last().and_then(|a| a["t"].as_f64())
                > read.get(EVENTS / 2).and_then(|r| r["t"].as_f64()),
            "the producer was still writing while the consumer read (the transfers happened mid-stream)"
        );
        Ok(())
    })
}

/// Waits for a child to exit (killing it at the deadline): (success, stdout).
fn wait_with_deadline(mut child: Child, timeout: Duration) -> anyhow::Result<(bool, String)> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            let out = child.wait_with_output()?;
            return Ok((status.success(), String::from_utf8_lossy(&out.stdout).into_owned()));
        }
        if std::time::Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            anyhow::bail!("did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every member's log but its messages, and its stderr's tail, for a failure's report.
fn member_logs(dir: &Path) -> String {
    let mut out = String::new();
    for name in ["r1", "r2", "r3", "r4", "s1", "s2"] {
        out.push_str(&format!("--- {name} ---\n"));
        for e in lines(&dir.join(format!("{name}.jsonl"))).iter().filter(|e| e["ev"] != "msg") {
            out.push_str(&format!("{e}\n"));
        }
        let err = std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(10).collect();
        for l in tail.into_iter().rev() {
            out.push_str(&format!("  stderr: {l}\n"));
        }
    }
    out
}

/// A member's ownership intervals per partition, from its log (a killed member's last event
/// ends them).
fn ownership(log: &[Value]) -> BTreeMap<u64, Vec<(f64, f64)>> {
    let end = log.last().and_then(|e| e["t"].as_f64()).unwrap_or(0.0);
    let mut open: BTreeMap<u64, f64> = BTreeMap::new();
    let mut out: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for e in log {
        let t = e["t"].as_f64().unwrap_or(0.0);
        let parts = e["parts"].as_array().into_iter().flatten().filter_map(Value::as_u64);
        match e["ev"].as_str() {
            Some("assign") => parts.for_each(|p| {
                open.entry(p).or_insert(t);
            }),
            Some("revoke") | Some("lost") => parts.for_each(|p| {
                if let Some(s) = open.remove(&p) {
                    out.entry(p).or_default().push((s, t));
                }
            }),
            _ => {}
        }
    }
    for (p, s) in open {
        out.entry(p).or_default().push((s, end));
    }
    out
}

#[test]
fn consumer_groups_of_real_clients_share_partitions_and_survive_a_killed_member() -> anyhow::Result<()> {
    with_cluster(|c, py| {
        let b = c.kafka_bootstrap();
        run(py, &["create-topic", &b, TOPIC, "6", "3"], Duration::from_secs(90))?;
        c.wait_for_leaders(TOPIC, 3)?;
        let dir = c.dir.path().to_path_buf();
        let produce = |n: usize, start: usize, name: &str| -> anyhow::Result<()> {
            let acked = dir.join(name);
            let args =
                ["produce", &b, TOPIC, &n.to_string(), acked.to_str().context("path")?, &start.to_string()];
            run(py, &args, Duration::from_secs(120)).map(|_| ())
        };
        produce(3000, 0, "first.jsonl")?;
        // Group "ranged": three confluent-kafka members and one kafka-python member, all range.
        // Group "sticky": two confluent-kafka members, cooperative-sticky (a group cannot mix
        // eager and cooperative assignors, in Kafka as here).
        let members: Vec<(&str, &str, &str, &str)> = vec![
            ("ranged", "confluent", "range", "r1"),
            ("ranged", "confluent", "range", "r2"),
            ("ranged", "confluent", "range", "r3"),
            ("ranged", "kafka-python", "range", "r4"),
            ("sticky", "confluent", "cooperative-sticky", "s1"),
            ("sticky", "confluent", "cooperative-sticky", "s2"),
        ];
        let mut children = Children(Vec::new());
        for (group, client, assignor, name) in &members {
            let log = dir.join(format!("{name}.jsonl"));
            let err = dir.join(format!("{name}.err"));
            children.0.push(spawn(
                py,
                &["member", client, &b, TOPIC, group, assignor, log.to_str().context("path")?],
                Some(&err),
            )?);
        }
        let consumed = |group: &str| -> BTreeSet<String> {
            members
                .iter()
                .filter(|m| m.0 == group)
                .flat_map(|m| lines(&dir.join(format!("{}.jsonl", m.3))))
                .filter(|e| e["ev"] == "msg")
                .filter_map(|e| e["v"].as_str().map(str::to_owned))
                .collect()
        };
        let all = |n: usize| (0..n).map(|i| format!("event-{i}")).collect::<BTreeSet<_>>();
        for group in ["ranged", "sticky"] {
            wait_for(&format!("group {group} consumed the first 3,000"), Duration::from_secs(90), || {
                (consumed(group) == all(3000)).then_some(())
            })
            .with_context(|| format!("{group}: {} consumed", consumed(group).len()))?;
        }
        // Every member of "ranged" got partitions (6 partitions, 4 members).
        for name in ["r1", "r2", "r3", "r4"] {
            let log = lines(&dir.join(format!("{name}.jsonl")));
            ensure!(!ownership(&log).is_empty(), "{name} was assigned partitions");
        }
        // SIGKILL r1: its partitions move to the others after its session times out.
        let mut r1 = children.0.remove(0);
        let killed = r1.kill();
        r1.wait()?;
        killed?;
        produce(3000, 3000, "second.jsonl")?;
        for group in ["ranged", "sticky"] {
            wait_for(&format!("group {group} consumed all 6,000"), Duration::from_secs(120), || {
                (consumed(group) == all(6000)).then_some(())
            })
            .with_context(|| format!("{group}: {} consumed\n{}", consumed(group).len(), member_logs(&dir)))?;
        }
        // No partition had two owners at once.
        for group in ["ranged", "sticky"] {
            let mut intervals: BTreeMap<u64, Vec<(f64, f64, &str)>> = BTreeMap::new();
            for m in members.iter().filter(|m| m.0 == group) {
                for (p, spans) in ownership(&lines(&dir.join(format!("{}.jsonl", m.3)))) {
                    intervals.entry(p).or_default().extend(spans.into_iter().map(|(s, e)| (s, e, m.3)));
                }
            }
            ensure!(intervals.len() == 6, "{group}: every partition was owned: {intervals:?}");
            for (p, mut spans) in intervals {
                spans.sort_by(|a, b| a.0.total_cmp(&b.0));
                for w in spans.windows(2) {
                    ensure!(
                        w[0].1 <= w[1].0,
                        "{group}: partition {p} owned by {} and {} at once: {w:?}",
                        w[0].2,
                        w[1].2
                    );
                }
            }
        }
        // The committed offsets reach the end: lag 0 everywhere.
        for group in ["ranged", "sticky"] {
            wait_for(&format!("{group}: lag 0"), Duration::from_secs(60), || {
                let out = c.ctl(&["group", "describe", group, "--output", "json"], None, CTL_TIMEOUT).ok()?;
                let d = out.json().ok()?;
                let parts = d["partitions"].as_array()?;
                (parts.len() == 6 && parts.iter().all(|p| p["lag"] == 0)).then_some(())
            })?;
        }
        // The others leave cleanly on SIGTERM.
        for child in &children.0 {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
        }
        for child in std::mem::take(&mut children.0) {
            let (ok, _) = wait_with_deadline(child, Duration::from_secs(30))?;
            ensure!(ok, "a member failed to stop cleanly");
        }
        Ok(())
    })
}
