//! Consumer groups end to end on real processes: three `eddyctl consume --group` members divide
//! a topic, one is SIGKILLed and the others take over its partitions from the committed offsets,
//! lag is reported, offsets are reset and the group is deleted.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::ensure;
use eddy_tests::Acked;
use eddy_tests::CTL_TIMEOUT;
use eddy_tests::Cluster;
use eddy_tests::GroupMember;
use eddy_tests::values;
use eddy_tests::wait_for;
use nix::sys::signal::Signal;
use serde_json::Value;

const TOPIC: &str = "jobs";
const GROUP: &str = "workers";
const SESSION: Duration = Duration::from_secs(3);

fn describe_group(c: &Cluster, group: &str) -> anyhow::Result<Value> {
    let out = c.ctl(&["group", "describe", group], None, CTL_TIMEOUT)?;
    ensure!(out.ok(), "group describe failed: {out:?}");
    out.json()
}

/// Partitions held by each member.
fn holdings(d: &Value) -> Vec<BTreeSet<u64>> {
    d["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    m["partitions"]
                        .as_array()
                        .map(|ps| ps.iter().filter_map(|p| p["partition"].as_u64()).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// True when every partition's committed offset has reached `acked`'s end (lag 0), and checks
/// that lag = high watermark - committed on every row.
fn caught_up(d: &Value, acked: &Acked) -> anyhow::Result<bool> {
    let parts = d["partitions"].as_array().context("partitions")?;
    ensure!(parts.len() == 6, "expected 6 partitions in the group's description: {d}");
    let mut all = true;
    for p in parts {
        let hw = p["high_watermark"].as_u64().context("high_watermark")?;
        let lag = p["lag"].as_u64().context("lag")?;
        match p["committed"].as_u64() {
            Some(c) => ensure!(lag == hw - c, "lag {lag} != high watermark {hw} - committed {c}: {p}"),
            None => ensure!(lag == hw, "lag {lag} != high watermark {hw} with nothing committed: {p}"),
        }
        let part = p["partition"].as_u64().context("partition")? as u32;
        let end = acked.get(&part).and_then(|a| a.keys().next_back()).map_or(0, |o| o + 1);
        all &= lag == 0 && p["committed"].as_u64() >= Some(end);
    }
    Ok(all)
}

#[test]
fn a_group_divides_partitions_survives_a_member_crash_and_resets() -> anyhow::Result<()> {
    let c = Cluster::start(3)?;
    let out = c.ctl(
        &["topic", "create", TOPIC, "--partitions", "6", "--replication-factor", "3"],
        None,
        CTL_TIMEOUT,
    )?;
    ensure!(out.ok(), "create: {out:?}");
    c.wait_for_leaders(TOPIC, 3)?;
    let mut acked = Acked::new();
    for p in 0..6 {
        c.produce(TOPIC, p, &values(&format!("a{p}"), 40), &mut acked)?;
    }

    // Bad input is refused with a message naming the field.
    let bad =
        c.ctl(&["consume", TOPIC, "--group", "no/slash", "--idle-exit-ms", "100"], None, CTL_TIMEOUT)?;
    ensure!(!bad.ok() && bad.stderr.contains("group"), "bad group name accepted: {bad:?}");
    let bad = c.ctl(&["consume", "nope", "--group", GROUP, "--idle-exit-ms", "100"], None, CTL_TIMEOUT)?;
    ensure!(!bad.ok() && bad.stderr.contains("nope"), "unknown topic accepted: {bad:?}");

    // 1. Three members get two partitions each.
    let session_ms = SESSION.as_millis().to_string();
    let flags = ["--session-timeout-ms", session_ms.as_str()];
    let mut members = (0..3)
        .map(|_| GroupMember::start(&c.brokers(), TOPIC, GROUP, &flags))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let d = wait_for("three members with two partitions each", Duration::from_secs(30), || {
        let d = describe_group(&c, GROUP).ok()?;
        let h = holdings(&d);
        (h.len() == 3 && h.iter().all(|s| s.len() == 2)).then_some(d)
    })?;
    let union: BTreeSet<u64> = holdings(&d).into_iter().flatten().collect();
    ensure!(union.len() == 6, "the members' partitions overlap: {d}");
    wait_for("the group to consume and commit everything", Duration::from_secs(30), || {
        caught_up(&describe_group(&c, GROUP).ok()?, &acked).ok()?.then_some(())
    })?;

    // Refused while the group has members.
    let refused = c.ctl(
        &["group", "reset-offsets", GROUP, "--topic", TOPIC, "--to-earliest", "--execute"],
        None,
        CTL_TIMEOUT,
    )?;
    ensure!(!refused.ok() && refused.stderr.contains("active members"), "reset with members: {refused:?}");

    // 2. SIGKILL one member; the other two take its partitions within the session timeout plus a
    // few seconds, and resume from its commits.
    let victim = members.remove(0);
    let killed_at = Instant::now();
    let victim_report = victim.stop(Signal::SIGKILL, Duration::from_secs(10))?;
    for p in 0..6 {
        c.produce(TOPIC, p, &values(&format!("b{p}"), 40), &mut acked)?;
    }
    wait_for("two members holding all six partitions", SESSION + Duration::from_secs(15), || {
        let h = holdings(&describe_group(&c, GROUP).ok()?);
        let all: BTreeSet<u64> = h.iter().flatten().copied().collect();
        (h.len() == 2 && all.len() == 6 && h.iter().all(|s| s.len() == 3)).then_some(())
    })?;
    let took = killed_at.elapsed();
    println!(
        "after SIGKILL of a member, the others held all partitions within {took:?} (session timeout {SESSION:?})"
    );
    ensure!(took <= SESSION + Duration::from_secs(5), "the rebalance after a crash took {took:?}");
    for p in 0..6 {
        c.produce(TOPIC, p, &values(&format!("c{p}"), 40), &mut acked)?;
    }
    // 3. Lag is high watermark - committed, and reaches 0.
    wait_for("the group to catch up after the crash", Duration::from_secs(30), || {
        caught_up(&describe_group(&c, GROUP).ok()?, &acked).ok()?.then_some(())
    })?;

    // Clean leave: SIGINT makes a member commit and leave.
    let mut consumed: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let mut reports = vec![victim_report];
    for m in members {
        let r = m.stop(Signal::SIGINT, Duration::from_secs(20))?;
        ensure!(r.code == Some(0), "member did not leave cleanly: {r:?}");
        reports.push(r);
    }
    for r in &reports {
        for rec in &r.records {
            let p = rec["partition"].as_u64().context("partition")? as u32;
            let o = rec["offset"].as_u64().context("offset")?;
            let v = rec["value"].as_str().context("value")?.to_owned();
            if let Some(prev) = consumed.insert((p, o), v.clone()) {
                ensure!(prev == v, "{p}/{o} read as {prev} and as {v}");
            }
        }
    }
    // Every acknowledged event was consumed at least once, with its value.
    for (p, events) in &acked {
        for (o, v) in events {
            ensure!(consumed.get(&(*p, *o)) == Some(v), "acknowledged {p}/{o} ({v}) was never consumed");
        }
    }
    let redelivered: usize = reports.iter().map(|r| r.records.len()).sum::<usize>() - consumed.len();
    println!("{} events consumed, {redelivered} delivered twice (at-least-once)", consumed.len());

    let list = c.ctl(&["group", "list"], None, CTL_TIMEOUT)?.json()?;
    let g = list["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == GROUP))
        .context("group listed")?;
    ensure!(g["state"] == "empty" && g["members"] == 0, "group after every member left: {g}");

    // Reset by time: before every event is the start of each partition.
    let epoch = c.ctl(
        &[
            "group",
            "reset-offsets",
            GROUP,
            "--topic",
            TOPIC,
            "--to-datetime",
            "1970-01-01T00:00:00Z",
            "--execute",
        ],
        None,
        CTL_TIMEOUT,
    )?;
    ensure!(epoch.ok(), "reset to a time: {epoch:?}");
    for p in describe_group(&c, GROUP)?["partitions"].as_array().context("partitions")? {
        ensure!(p["committed"] == 0 && p["lag"] == p["high_watermark"], "after reset to 1970: {p}");
    }
    // Reset: a dry run changes nothing; --execute moves every partition to offset 100.
    let dry = c.ctl(
        &["group", "reset-offsets", GROUP, "--topic", TOPIC, "--to-offset", "100", "--dry-run"],
        None,
        CTL_TIMEOUT,
    )?;
    ensure!(dry.ok(), "dry run: {dry:?}");
    for p in describe_group(&c, GROUP)?["partitions"].as_array().context("partitions")? {
        ensure!(p["committed"] == 0, "a dry run changed the offsets: {p}");
    }
    let exec = c.ctl(
        &["group", "reset-offsets", GROUP, "--topic", TOPIC, "--to-offset", "100", "--execute"],
        None,
        CTL_TIMEOUT,
    )?;
    ensure!(exec.ok(), "reset: {exec:?}");
    let d = describe_group(&c, GROUP)?;
    for p in d["partitions"].as_array().context("partitions")? {
        ensure!(p["committed"] == 100 && p["lag"] == 20, "after reset to 100: {p}");
    }
    // A new member resumes at the reset offsets, and exits when idle.
    let m = GroupMember::start(&c.brokers(), TOPIC, GROUP, &["--idle-exit-ms", "1500"])?;
    let r = m.wait(Duration::from_secs(30))?;
    ensure!(r.code == Some(0), "idle member: {r:?}");
    let mut per_partition: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for rec in &r.records {
        per_partition
            .entry(rec["partition"].as_u64().context("partition")?)
            .or_default()
            .push(rec["offset"].as_u64().context("offset")?);
    }
    ensure!(per_partition.len() == 6, "the new member read {} partitions", per_partition.len());
    for (p, offsets) in &per_partition {
        ensure!(
            *offsets == (100..120).collect::<Vec<u64>>(),
            "partition {p} read {offsets:?} after the reset"
        );
    }

    let del = c.ctl(&["group", "delete", GROUP], None, CTL_TIMEOUT)?;
    ensure!(del.ok(), "delete: {del:?}");
    let gone = c.ctl(&["group", "describe", GROUP], None, CTL_TIMEOUT)?;
    ensure!(!gone.ok() && gone.stderr.contains("does not exist"), "describe after delete: {gone:?}");
    Ok(())
}
