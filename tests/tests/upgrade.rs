//! Upgrades (issue 12, acceptance 6, first half): a data directory written by an earlier Eddy is
//! served by this one.
//!
//! `tests/fixtures/data-v1` is a one-node cluster's data directory written at 491a890 (the stored
//! formats of c294fee: segment frames, the log state file, sled trees, metadata state version
//! 5), with its config. It holds topic `orders` (3 partitions, 100 keyed events each), topic
//! `audit` (400 events in 16 KiB segments, so several segment files) and consumer group
//! `billing`, committed at 100 on every `orders` partition. The test starts this build's node
//! on a copy and checks that it serves every event, with its key, at its offset, keeps the
//! group's commits, and takes new writes after them. The node's addresses are stored in its
//! metadata, so it runs on the fixture's ports (39091, 39191, 39291); the test fails, saying
//! so, when one is taken. Never edit the fixture: write a new one for a new format and keep
//! this one.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use anyhow::ensure;
use eddy_tests::binary;
use eddy_tests::run_ctl;
use eddy_tests::wait_for;

const BROKERS: &str = "127.0.0.1:39091";

/// The node process, killed by its handle when dropped.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().context("run cp")?;
    ensure!(status.success(), "cp -a {} {}", from.display(), to.display());
    Ok(())
}

#[test]
fn a_data_directory_written_by_an_earlier_version_is_served_whole() -> anyhow::Result<()> {
    for port in [39091, 39191, 39291] {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("the fixture's node needs 127.0.0.1:{port}, which is taken"))?;
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data-v1");
    let dir = tempfile::Builder::new().prefix("eddy-upgrade-").tempdir()?;
    copy_dir(&fixture.join("data"), dir.path())?;
    let log = std::fs::File::create(dir.path().join("node.log"))?;
    let node = Node(
        Command::new(binary("eddy-node"))
            .arg("--config")
            .arg(fixture.join("node-1.toml"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "info,openraft=error")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("start eddy-node on the fixture")?,
    );
    let t = Duration::from_secs(30);
    let tail = || std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
    wait_for("the node to serve its partitions", Duration::from_secs(60), || {
        run_ctl(BROKERS, &["consume", "orders", "--partition", "0", "--count", "1"], None, t)
            .ok()?
            .ok()
            .then_some(())
    })
    .with_context(|| format!("node log:\n{}", tail()))?;

    for p in 0..3u32 {
        let out = run_ctl(
            BROKERS,
            &["consume", "orders", "--partition", &p.to_string(), "--count", "100"],
            None,
            t,
        )?;
        ensure!(out.ok(), "consume orders/{p}: {}", out.stderr);
        let records = out.json_lines()?;
        ensure!(records.len() == 100, "orders/{p}: {} records", records.len());
        for (i, r) in records.iter().enumerate() {
            ensure!(r["offset"] == i as u64, "orders/{p}: offset {} at position {i}", r["offset"]);
            ensure!(r["value"] == format!("order-{p}-{}", i + 1).as_str(), "orders/{p}@{i}: {r}");
            ensure!(r["key"] == format!("k{p}").as_str(), "orders/{p}@{i}: key of {r}");
        }
    }
    let out = run_ctl(BROKERS, &["consume", "audit", "--partition", "0", "--count", "400"], None, t)?;
    ensure!(out.ok(), "consume audit: {}", out.stderr);
    let values: Vec<String> =
        out.json_lines()?.iter().map(|r| r["value"].as_str().unwrap_or_default().to_owned()).collect();
    let expected: Vec<String> =
        (1..=400).map(|i| format!("audit-event-with-some-padding-to-fill-segments-{i}")).collect();
    ensure!(values == expected, "audit: {} records, not the 400 written", values.len());

    let group = run_ctl(BROKERS, &["group", "describe", "billing"], None, t)?;
    ensure!(group.ok(), "group describe: {}", group.stderr);
    let group = group.json()?;
    let parts = group["partitions"].as_array().context("partitions")?;
    ensure!(parts.len() == 3, "{group}");
    for p in parts {
        ensure!(p["committed"] == 100, "billing's commit kept: {p}");
    }

    // New writes follow the old ones.
    let out = run_ctl(BROKERS, &["produce", "orders", "--partition", "1"], Some(b"after-upgrade\n"), t)?;
    ensure!(out.ok(), "produce after the upgrade: {}", out.stderr);
    let ack = out.json_lines()?;
    ensure!(ack.len() == 1 && ack[0]["offset"] == 100, "the new event follows the old ones: {ack:?}");
    drop(node);
    Ok(())
}
