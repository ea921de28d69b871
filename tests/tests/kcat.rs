//! A real Kafka client against a 3-node cluster: kcat (librdkafka), installed from Debian's
//! packages by the test itself when missing. It lists brokers and topics, produces keyed
//! events with headers once per compression codec and reads them back byte for byte, seeks by
//! timestamp, and exchanges events with `eddyctl` in both directions.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use anyhow::ensure;
use eddy_tests::CTL_TIMEOUT;
use eddy_tests::Cluster;
use eddy_tests::wait_for;
use serde_json::Value;

const TOPIC: &str = "events";
const KCAT_TIMEOUT: Duration = Duration::from_secs(60);
const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];
const PER_CODEC: usize = 20;

/// Runs kcat with `args` (and `stdin`), bounded in time; its stdout.
fn kcat(kcat: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(kcat)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start kcat")?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let deadline = std::time::Instant::now() + KCAT_TIMEOUT;
    while !waiter.is_finished() {
        if std::time::Instant::now() > deadline {
            // Stop it by its PID; the waiter then returns.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = waiter.join();
            anyhow::bail!("kcat {args:?} did not finish within {KCAT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = waiter.join().map_err(|_| anyhow::anyhow!("kcat waiter panicked"))??;
    ensure!(
        out.status.success(),
        "kcat {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A counter from node `id`'s `/metrics`.
fn kafka_counter(c: &Cluster, id: u64, name: &str) -> anyhow::Result<f64> {
    let (status, body) = c.http_get(id, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    let line = body
        .lines()
        .find(|l| l.starts_with(&format!("{name}_total ")))
        .with_context(|| format!("{name} on node {id}"))?;
    Ok(line.rsplit(' ').next().context("value")?.parse()?)
}

fn json_lines(out: &str) -> anyhow::Result<Vec<Value>> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("parse {l}")))
        .collect()
}

#[test]
fn kcat_produces_and_consumes_with_every_codec() -> anyhow::Result<()> {
    let kcat_bin = eddy_tests::program("kcat", "kcat")?;
    let c = Cluster::start(3)?;
    let result = c.wait_for_kafka().and_then(|()| scenario(&c, &kcat_bin));
    if result.is_err() {
        for id in c.nodes.keys() {
            eprintln!("--- node {id} log tail ---\n{}", c.log_tail(*id, 30));
        }
    }
    result
}

fn scenario(c: &Cluster, kcat_bin: &Path) -> anyhow::Result<()> {
    let out = c.ctl(
        &["topic", "create", TOPIC, "--partitions", "3", "--replication-factor", "3"],
        None,
        CTL_TIMEOUT,
    )?;
    ensure!(out.ok(), "create topic: {}", out.stderr);
    let bootstrap = c.kafka_bootstrap();
    let b = bootstrap.as_str();

    // -L: three brokers and the topic, every partition with a leader.
    let md: Value = wait_for("kcat -L with every leader", Duration::from_secs(30), || {
        let out = kcat(kcat_bin, &["-b", b, "-L", "-J"], None).ok()?;
        let md: Value = serde_json::from_str(&out).ok()?;
        let t = md["topics"].as_array()?.iter().find(|t| t["topic"] == TOPIC)?;
        let partitions = t["partitions"].as_array()?;
        (partitions.len() == 3 && partitions.iter().all(|p| p["leader"].as_i64().is_some_and(|l| l > 0)))
            .then_some(md)
    })?;
    let brokers = md["brokers"].as_array().context("brokers")?;
    ensure!(brokers.len() == 3, "kcat sees {} brokers", brokers.len());
    for n in c.nodes.values() {
        ensure!(
            brokers.iter().any(|b| b["id"] == n.id && b["name"] == n.kafka_addr),
            "broker {} at {}",
            n.id,
            n.kafka_addr
        );
    }

    // -P: keyed events with headers, once per codec, to partition 0.
    for codec in CODECS {
        let input: String = (0..PER_CODEC)
            .map(|i| format!("{codec}-{i}:value {codec} {i} {}\n", "x".repeat(i * 10)))
            .collect();
        kcat(
            kcat_bin,
            &[
                "-b",
                b,
                "-P",
                "-t",
                TOPIC,
                "-p",
                "0",
                "-K",
                ":",
                "-H",
                &format!("codec={codec}"),
                "-H",
                "origin=kcat",
                "-z",
                codec,
                "-X",
                "linger.ms=20",
            ],
            Some(&input),
        )
        .with_context(|| format!("produce with {codec}"))?;
    }
    // -C: back byte for byte, in order, from the beginning.
    let total = CODECS.len() * PER_CODEC;
    let out = kcat(
        kcat_bin,
        &["-b", b, "-C", "-t", TOPIC, "-p", "0", "-o", "beginning", "-c", &total.to_string(), "-e", "-J"],
        None,
    )?;
    let read = json_lines(&out)?;
    ensure!(read.len() == total, "read {} of {total}", read.len());
    for (i, m) in read.iter().enumerate() {
        let (codec, n) = (CODECS[i / PER_CODEC], i % PER_CODEC);
        ensure!(m["offset"] == i, "offset of message {i}: {m}");
        ensure!(m["key"] == format!("{codec}-{n}"), "key of message {i}: {m}");
        ensure!(
            m["payload"] == format!("value {codec} {n} {}", "x".repeat(n * 10)),
            "value of message {i}: {m}"
        );
        let headers = m["headers"].as_array().context("headers")?;
        ensure!(
            headers
                == &vec![
                    Value::from("codec"),
                    Value::from(codec),
                    Value::from("origin"),
                    Value::from("kcat")
                ],
            "headers of message {i}: {m}"
        );
        ensure!(m["ts"].as_i64().is_some_and(|t| t > 1_600_000_000_000), "timestamp of message {i}: {m}");
    }

    // Follower fetching (KIP-392): a consumer in a follower's rack is sent by the leader to that
    // follower, which serves the records from its replica.
    let leader = md["topics"]
        .as_array()
        .context("topics")?
        .iter()
        .find(|t| t["topic"] == TOPIC)
        .context("topic")?["partitions"][0]["leader"]
        .as_u64()
        .context("leader")?;
    let follower = c.nodes.keys().copied().find(|n| *n != leader).context("a follower")?;
    let before = (
        kafka_counter(c, follower, "eddy_kafka_fetch_records")?,
        kafka_counter(c, leader, "eddy_kafka_read_replica_redirects")?,
    );
    let rack = format!("client.rack={}", eddy_tests::rack(follower));
    let out = kcat(
        kcat_bin,
        &[
            "-b",
            b,
            "-C",
            "-t",
            TOPIC,
            "-p",
            "0",
            "-o",
            "beginning",
            "-c",
            &total.to_string(),
            "-e",
            "-J",
            "-X",
            &rack,
        ],
        None,
    )?;
    let from_follower = json_lines(&out)?;
    ensure!(from_follower.len() == total, "read {} of {total} with {rack}", from_follower.len());
    for (f, l) in from_follower.iter().zip(&read) {
        for field in ["offset", "key", "payload", "headers", "ts"] {
            ensure!(f[field] == l[field], "{field} differs: {f} vs {l}");
        }
    }
    // kcat names the broker that served each event: after the first fetch, the follower.
    ensure!(
        from_follower.last().is_some_and(|m| m["broker"] == follower),
        "served by {follower}: {:?}",
        from_follower.last()
    );
    let after = (
        kafka_counter(c, follower, "eddy_kafka_fetch_records")?,
        kafka_counter(c, leader, "eddy_kafka_read_replica_redirects")?,
    );
    ensure!(
        after.0 >= before.0 + total as f64,
        "node {follower} (rack {rack}) served the records: {before:?} -> {after:?}"
    );
    ensure!(after.1 > before.1, "leader {leader} redirected the consumer: {before:?} -> {after:?}");

    // Seek by timestamp: from the timestamp of the first zstd event, the first event read is at
    // or before it in the log and every one after has a timestamp at or after it.
    let first_zstd = &read[4 * PER_CODEC];
    let ts = first_zstd["ts"].as_i64().context("ts")?;
    let out = kcat(
        kcat_bin,
        &["-b", b, "-C", "-t", TOPIC, "-p", "0", "-o", &format!("s@{ts}"), "-c", "1", "-e", "-J"],
        None,
    )?;
    let seeked = json_lines(&out)?;
    let first = seeked.first().context("an event after the timestamp")?;
    let offset = first["offset"].as_u64().context("offset")?;
    ensure!(first["ts"].as_i64().is_some_and(|t| t >= ts), "seek by timestamp read {first}");
    ensure!(offset <= 4 * PER_CODEC as u64, "seek by timestamp went past the first zstd event: {first}");
    ensure!(
        read[..offset as usize].iter().all(|m| m["ts"].as_i64() < Some(ts)),
        "every event before {offset} is older"
    );

    // eddyctl reads what kcat wrote, with key, headers and timestamp.
    let out = c.ctl(
        &["consume", TOPIC, "--partition", "0", "--count", "3", "--output", "json"],
        None,
        CTL_TIMEOUT,
    )?;
    ensure!(out.ok(), "eddyctl consume: {}", out.stderr);
    let got = out.json_lines()?;
    ensure!(got.len() == 3);
    for (g, k) in got.iter().zip(&read) {
        ensure!(g["key"] == k["key"] && g["value"] == k["payload"], "eddyctl reads kcat's event: {g} vs {k}");
        ensure!(g["timestamp_ms"] == k["ts"], "timestamp: {g} vs {k}");
        ensure!(g["headers"]["codec"] == "none" && g["headers"]["origin"] == "kcat", "headers: {g}");
    }

    // kcat reads what eddyctl wrote.
    let out = c.ctl(
        &[
            "produce",
            TOPIC,
            "--partition",
            "1",
            "--key",
            "from-eddyctl",
            "--header",
            "origin=eddyctl",
            "--output",
            "json",
        ],
        Some(b"first\nsecond\n"),
        CTL_TIMEOUT,
    )?;
    ensure!(out.ok(), "eddyctl produce: {}", out.stderr);
    let out = c.ctl(
        &["consume", TOPIC, "--partition", "1", "--count", "2", "--output", "json"],
        None,
        CTL_TIMEOUT,
    )?;
    let by_eddyctl = out.json_lines()?;
    let out = kcat(
        kcat_bin,
        &["-b", b, "-C", "-t", TOPIC, "-p", "1", "-o", "beginning", "-c", "2", "-e", "-J"],
        None,
    )?;
    let by_kcat = json_lines(&out)?;
    ensure!(by_kcat.len() == 2, "kcat read {} events", by_kcat.len());
    for (k, e) in by_kcat.iter().zip(&by_eddyctl) {
        ensure!(k["key"] == "from-eddyctl" && k["payload"] == e["value"], "kcat reads eddyctl's event: {k}");
        ensure!(k["ts"] == e["timestamp_ms"], "timestamp: {k} vs {e}");
        ensure!(k["headers"] == serde_json::json!(["origin", "eddyctl"]), "headers: {k}");
    }
    Ok(())
}
