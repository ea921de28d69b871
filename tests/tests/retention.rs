//! Retention and time on real processes: `consume --from-time` starts at the first event
//! stamped at or after the time; a topic with `retention.ms` and small segments loses its old
//! segments (log start advances, disk use drops, offset 0 is out of range); and a follower that
//! was down while the leader purged comes back through a snapshot and serves from its new start.

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
use eddy_tests::wait_for;
use serde_json::Value;

/// Retention checks run this often in these tests (5 s by default).
const CHECK_INTERVAL_MS: u64 = 500;
const RETENTION_MS: u64 = 5000;

fn ctl(c: &Cluster, args: &[&str]) -> anyhow::Result<CtlOutput> {
    c.ctl(args, None, CTL_TIMEOUT)
}

fn with_cluster(scenario: impl FnOnce(&mut Cluster) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut c = Cluster::start_with(3, &format!("retention_check_interval_ms = {CHECK_INTERVAL_MS}\n"))?;
    let result = scenario(&mut c);
    if result.is_err() {
        for id in c.nodes.keys().copied().collect::<Vec<_>>() {
            eprintln!("--- node {id} log tail ---\n{}", c.log_tail(id, 30));
        }
    }
    result
}

fn create_topic(c: &Cluster, name: &str, config: &[&str]) -> anyhow::Result<Value> {
    let mut args = vec!["topic", "create", name, "--partitions", "1", "--replication-factor", "3"];
    for kv in config {
        args.extend(["--config", kv]);
    }
    let out = retry("the topic to be created", Duration::from_secs(20), || {
        let out = ctl(c, &args)?;
        ensure!(out.ok(), "topic create failed: {}", out.stderr);
        Ok(out)
    })?;
    drop(out);
    c.wait_for_leaders(name, 3)
}

/// `consume TOPIC --partition 0 ARGS` as JSON lines.
fn consume(c: &Cluster, topic: &str, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut all = vec!["consume", topic, "--partition", "0"];
    all.extend_from_slice(args);
    let out = ctl(c, &all)?;
    ensure!(out.ok(), "consume {args:?} failed: {}", out.stderr);
    out.json_lines()
}

/// Milliseconds since the Unix epoch as RFC 3339 with an offset of +02:00 (so the parser's
/// handling of offsets is exercised too).
fn rfc3339(ms: i64) -> String {
    let shifted = ms + 2 * 3600 * 1000;
    let (secs, millis) = (shifted.div_euclid(1000), shifted.rem_euclid(1000));
    let (days, s) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}+02:00", s / 3600, s % 3600 / 60, s % 60)
}

/// `topic offsets TOPIC --time SPEC [--replica R]`: partition 0's offset.
fn offset_of(c: &Cluster, topic: &str, spec: &str, replica: Option<u64>) -> anyhow::Result<u64> {
    let r = replica.map(|r| r.to_string());
    let mut args = vec!["topic", "offsets", topic, "--time", spec];
    if let Some(r) = &r {
        args.extend(["--replica", r]);
    }
    let out = ctl(c, &args)?;
    ensure!(out.ok(), "topic offsets {spec} failed: {}", out.stderr);
    let v = out.json()?;
    let p = &v["partitions"][0];
    ensure!(p["partition"] == 0, "unexpected answer {v}");
    p["offset"].as_u64().context("offset")
}

fn log_start(c: &Cluster, topic: &str) -> anyhow::Result<u64> {
    partition_info(&c.describe(topic)?, 0)?["log_start_offset"].as_u64().context("log_start_offset")
}

#[test]
fn consume_from_time_starts_at_the_first_event_at_or_after_it() -> anyhow::Result<()> {
    with_cluster(|c| {
        let topic = "clicks";
        create_topic(c, topic, &[])?;
        let mut acked = Acked::new();
        // Three rounds of events; each round is stamped by the leader's clock when it arrives,
        // so rounds have distinct, increasing timestamps.
        for round in 0..3 {
            let values = eddy_tests::values(&format!("round{round}"), 50);
            c.produce(topic, 0, &values, &mut acked)?;
            let last = consume(c, topic, &["--from", &(50 * round + 49).to_string(), "--count", "1"])?;
            let ts = last[0]["timestamp_ms"].as_i64().context("timestamp")?;
            wait_for("the clock to move past the round", Duration::from_secs(5), || {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
                (i64::try_from(now.as_millis()).ok()? > ts + 2).then_some(())
            })?;
        }
        let all = consume(c, topic, &["--count", "150"])?;
        let stamps: Vec<i64> =
            all.iter().map(|r| r["timestamp_ms"].as_i64()).collect::<Option<_>>().context("ts")?;
        ensure!(stamps.len() == 150, "read {} events", stamps.len());
        let first_at_or_after = |t: i64| stamps.iter().position(|s| *s >= t).map(|p| p as u64);

        // Times: every distinct timestamp, one millisecond after each (between stamps), before
        // everything, and after everything.
        let mut times: Vec<i64> = stamps.clone();
        times.dedup();
        times.extend(stamps.iter().map(|s| s + 1));
        times.extend([stamps[0] - 60_000, stamps[149] + 1]);
        times.sort_unstable();
        times.dedup();
        let mut starts_checked = 0;
        for t in times {
            let expect = first_at_or_after(t);
            let found = offset_of(c, topic, &rfc3339(t), None)?;
            ensure!(found == expect.unwrap_or(150), "offsets at {t}: {found}, expected {expect:?}");
            // `consume --from-time` starts there, on a follower.
            if let Some(o) = expect.filter(|o| *o == 0 || stamps[*o as usize - 1] < stamps[*o as usize]) {
                let got = consume(c, topic, &["--from-time", &rfc3339(t), "--count", "1"])?;
                ensure!(got[0]["offset"] == o, "consume --from-time {t} started at {}, expected {o}", got[0]);
                ensure!(got[0]["timestamp_ms"].as_i64() >= Some(t), "the first event is older than {t}");
                starts_checked += 1;
            }
        }
        ensure!(starts_checked >= 4, "only {starts_checked} distinct start points");
        ensure!(offset_of(c, topic, "earliest", None)? == 0, "earliest");
        ensure!(offset_of(c, topic, "latest", None)? == 150, "latest");
        // A bad time is refused by name.
        let out = ctl(c, &["consume", topic, "--partition", "0", "--from-time", "yesterday"])?;
        ensure!(!out.ok() && out.stderr.contains("RFC 3339"), "bad time: {out:?}");
        Ok(())
    })
}

/// 2 MB of events in 1 KB events: about 32 segments of 64 KiB.
fn produce_two_megabytes(c: &Cluster, topic: &str, prefix: &str) -> anyhow::Result<Acked> {
    let mut acked = Acked::new();
    let values: Vec<String> = (0..2048).map(|i| format!("{prefix}-{i:05}-{}", "x".repeat(1000))).collect();
    c.produce(topic, 0, &values, &mut acked)?;
    Ok(acked)
}

#[test]
fn retention_deletes_old_segments_and_fetch_below_the_start_is_out_of_range() -> anyhow::Result<()> {
    with_cluster(|c| {
        let topic = "orders";
        // Invalid settings are refused, naming the key.
        for (kv, key) in [("retention.ms=0", "retention.ms"), ("segment.bytes=10", "segment.bytes")] {
            let out = ctl(
                c,
                &["topic", "create", "bad", "--partitions", "1", "--replication-factor", "1", "--config", kv],
            )?;
            ensure!(!out.ok() && out.stderr.contains(&format!("config.{key}")), "{kv}: {out:?}");
        }
        create_topic(c, topic, &[&format!("retention.ms={RETENTION_MS}"), "segment.bytes=65536"])?;
        let started = Instant::now();
        let acked = produce_two_megabytes(c, topic, "old")?;
        let produced = Instant::now();
        let hw = retry("the leader to apply every event", Duration::from_secs(20), || {
            c.high_watermark(topic, 0, &acked)
        })?;
        ensure!(hw == 2048, "high watermark {hw}");
        let before = wait_for("every replica to hold the 2 MB", Duration::from_secs(10), || {
            let before: Vec<(u64, u64)> =
                (1..=3).map(|id| c.partition_log_bytes(id).ok().map(|b| (id, b))).collect::<Option<_>>()?;
            before.iter().all(|(_, b)| *b >= 2_000_000).then_some(before)
        })?;

        // Every event is old 5 s after it was produced; the log start must then advance within
        // the check interval plus a margin, and not before the oldest event was 5 s old.
        let margin = Duration::from_secs(3);
        let deadline = produced + Duration::from_millis(RETENTION_MS + CHECK_INTERVAL_MS) + margin;
        let start =
            wait_for("the log start to advance", deadline.saturating_duration_since(Instant::now()), || {
                log_start(c, topic).ok().filter(|s| *s > 0)
            })?;
        let advanced = Instant::now();
        ensure!(
            advanced - started >= Duration::from_millis(RETENTION_MS),
            "the log start advanced {:?} after the first event, before it was {RETENTION_MS} ms old",
            advanced - started
        );
        eprintln!(
            "log start advanced to {start} {:?} after the last event was produced (retention {RETENTION_MS} ms, check every {CHECK_INTERVAL_MS} ms)",
            advanced - produced
        );
        // Segments age one after the other; once every event is old, only the active segment
        // (64 KiB, or the one batch that overflowed it) is kept.
        let start = wait_for("all but the active segment to go", Duration::from_secs(5), || {
            log_start(c, topic).ok().filter(|s| *s >= 1024)
        })?;
        ensure!(start <= 2048, "log start {start} beyond the high watermark");

        // Disk use drops on every replica, and each keeps at most two segments: followers
        // split replication batches at `segment.bytes` as the leader splits its appends (they
        // used to write each batch whole into one segment, and kept hundreds of kilobytes).
        let after = wait_for("every replica to delete its old segments", Duration::from_secs(10), || {
            let after: Vec<(u64, u64)> =
                (1..=3).map(|id| c.partition_log_bytes(id).ok().map(|b| (id, b))).collect::<Option<_>>()?;
            let dropped = after.iter().zip(&before).all(|((_, a), (_, b))| a < b && *a <= 2 * 65536);
            dropped.then_some(after)
        })?;
        eprintln!("partition log bytes per node before {before:?}, after {after:?}");

        // Offset 0 is out of range, with a message naming both offsets.
        let out = ctl(c, &["consume", topic, "--partition", "0", "--from", "0", "--count", "1"])?;
        ensure!(!out.ok(), "fetching offset 0 must fail: {out:?}");
        ensure!(
            out.stderr.contains("offset 0 is below the log start offset")
                && out.stderr.contains(&format!("{topic}/0")),
            "unclear error: {}",
            out.stderr
        );
        // Consuming without --from starts at the log start, with the events acknowledged there.
        let leader_start = log_start(c, topic)?;
        let mut acked = acked;
        c.produce(topic, 0, &eddy_tests::values("new", 5), &mut acked)?;
        let n = (2048 + 5 - leader_start).to_string();
        let rest = consume(c, topic, &["--replica", "leader", "--count", &n])?;
        ensure!(
            rest.first().is_some_and(|r| r["offset"] == leader_start),
            "consume starts at {:?}",
            rest.first()
        );
        for r in &rest {
            let o = r["offset"].as_u64().context("offset")?;
            ensure!(
                Some(r["value"].as_str().unwrap_or_default()) == acked[&0].get(&o).map(String::as_str),
                "offset {o}"
            );
        }
        ensure!(offset_of(c, topic, "earliest", None)? == leader_start, "earliest is the log start");
        Ok(())
    })
}

#[test]
fn a_follower_back_after_the_purge_installs_a_snapshot_and_serves_from_its_start() -> anyhow::Result<()> {
    with_cluster(|c| {
        let topic = "payments";
        let info = create_topic(c, topic, &[&format!("retention.ms={RETENTION_MS}"), "segment.bytes=65536"])?;
        let leader = partition_info(&info, 0)?["leader"].as_u64().context("leader")?;
        let mut acked = Acked::new();
        c.produce(topic, 0, &eddy_tests::values("early", 10), &mut acked)?;
        let follower = (1..=3).find(|id| *id != leader).context("a follower")?;
        ensure!(c.stop_node(follower, Duration::from_secs(10))?, "node {follower} did not stop");

        // While it is down: 2 MB more, then retention purges the leader's log past everything
        // the follower has.
        let more = produce_two_megabytes(c, topic, "late")?;
        acked.entry(0).or_default().extend(more[&0].clone());
        let start = wait_for("the log start to advance", Duration::from_secs(15), || {
            log_start(c, topic).ok().filter(|s| *s > 10)
        })?;
        wait_for("the leader to purge", Duration::from_secs(10), || {
            (c.partition_log_bytes(leader).ok()? < 1 << 20).then_some(())
        })?;

        // Back: the follower installs the leader's snapshot and catches up.
        c.start_node(follower)?;
        let fresh = eddy_tests::values("after", 20);
        c.produce(topic, 0, &fresh, &mut acked)?;
        let hw = c.high_watermark(topic, 0, &acked)?;
        ensure!(hw == 2078, "high watermark {hw}");
        let follower_start = wait_for("the follower to catch up", Duration::from_secs(20), || {
            let latest = offset_of(c, topic, "latest", Some(follower)).ok()?;
            let earliest = offset_of(c, topic, "earliest", Some(follower)).ok()?;
            (latest == hw).then_some(earliest)
        })?;
        // It has no records before the snapshot: its log starts at or after the leader's.
        ensure!(follower_start >= start, "follower starts at {follower_start}, the group at {start}");
        eprintln!(
            "group log start {start}; the returning follower starts at {follower_start}; high watermark {hw}"
        );
        let out = ctl(
            c,
            &[
                "consume",
                topic,
                "--partition",
                "0",
                "--replica",
                &follower.to_string(),
                "--from",
                "0",
                "--count",
                "1",
            ],
        )?;
        ensure!(
            !out.ok() && out.stderr.contains(&format!("below the log start offset {follower_start}")),
            "offset 0 from the follower: {out:?}"
        );
        // It serves everything from its start, the same events as the leader.
        let n = hw - follower_start;
        let from_follower =
            consume(c, topic, &["--replica", &follower.to_string(), "--count", &n.to_string()])?;
        ensure!(from_follower.len() as u64 == n, "the follower served {} of {n}", from_follower.len());
        for (i, r) in from_follower.iter().enumerate() {
            let o = r["offset"].as_u64().context("offset")?;
            ensure!(o == follower_start + i as u64, "offsets are dense from the start: {o} at {i}");
            ensure!(
                r["value"].as_str() == acked[&0].get(&o).map(String::as_str),
                "offset {o} on the follower"
            );
        }
        Ok(())
    })
}
