//! A node whose disk fills up (issue 12, acceptance 4): it refuses writes with an error that
//! names the cause, hands its leaderships over so the partitions it led take writes elsewhere,
//! keeps serving reads, and takes writes again once space is freed, with nothing acknowledged
//! lost.
//!
//! Node 1's data lives on a 256 MiB tmpfs of its own, which the test fills with a file to 16 MiB
//! short of full (below the node's 64 MiB `storage_min_free_bytes`), and then removes. Needs root to mount (CI runs as root); fails saying so
//! otherwise. The mount is removed by its handle, however the test ends.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use anyhow::ensure;
use eddy_tests::Acked;
use eddy_tests::Cluster;
use eddy_tests::partition_info;
use eddy_tests::values;
use eddy_tests::wait_for;

/// A tmpfs mounted at `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> anyhow::Result<Self> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .context("run mount")?;
        ensure!(
            out.status.success(),
            "mount a tmpfs for node 1's data (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp").arg("-a").arg(format!("{}/.", from.display())).arg(to).status()?;
    ensure!(status.success(), "cp -a {} {}", from.display(), to.display());
    Ok(())
}

#[test]
fn a_full_disk_refuses_writes_by_name_serves_reads_and_recovers() -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let t = Duration::from_secs(30);
    let all_up = |c: &Cluster| {
        wait_for("every node up", t, || {
            let s = c.ctl(&["cluster", "status"], None, t).ok()?.json().ok()?;
            s["nodes"].as_array()?.iter().all(|n| n["up"] == true).then_some(())
        })
    };
    all_up(&c)?;
    // Node 1's data moves onto a small disk of its own.
    ensure!(c.stop_node(1, t)?, "node 1 did not stop");
    let data = c.data_dir(1);
    let saved = c.dir.path().join("data-1-saved");
    std::fs::rename(&data, &saved).with_context(|| format!("move {} aside", data.display()))?;
    std::fs::create_dir(&data).context("make the mount point")?;
    let disk = Tmpfs::mount(&data, 256 << 20)?;
    copy_dir(&saved, &data)?;
    c.start_node(1)?;
    all_up(&c)?;

    // A replicated topic, and a topic with one replica, on node 1.
    let out =
        c.ctl(&["topic", "create", "shared", "--partitions", "3", "--replication-factor", "3"], None, t)?;
    ensure!(out.ok(), "{}", out.stderr);
    let out =
        c.ctl(&["topic", "create", "solo", "--partitions", "1", "--replication-factor", "1"], None, t)?;
    ensure!(out.ok(), "{}", out.stderr);
    c.wait_for_leaders("solo", 1)?;
    let out =
        c.ctl(&["partition", "move", "solo/0", "--replicas", "1", "--wait"], None, Duration::from_secs(60))?;
    ensure!(out.ok(), "move solo/0 to node 1: {}", out.stderr);
    c.wait_for_leaders("shared", 3)?;
    let mut acked = Acked::new();
    let mut solo = Acked::new();
    for p in 0..3 {
        c.produce("shared", p, &values(&format!("before-{p}"), 50), &mut acked)?;
    }
    c.produce("solo", 0, &values("solo-before", 20), &mut solo)?;

    // Fill node 1's disk to 16 MiB short of full: below its 64 MiB reserve.
    let filler = data.join("filler");
    let filled = eddy_tests::netns::fill_disk(&filler, 16 << 20).context("fill node 1's disk")?;
    ensure!(filled > 0, "the filler wrote nothing");

    // Node 1 hands over every leadership it held...
    wait_for("node 1 to lead no replicated partition", t, || {
        let d = c.describe("shared").ok()?;
        (0..3).all(|p| partition_info(&d, p).is_ok_and(|i| i["leader"] != 1)).then_some(())
    })?;
    // ...and refuses writes to what only it holds, naming the cause.
    // (eddyctl retries a retriable error until its delivery timeout, then names it.)
    let out =
        c.ctl(&["--delivery-timeout", "3s", "produce", "solo", "--partition", "0"], Some(b"refused\n"), t)?;
    ensure!(!out.ok(), "a produce to a full node was acknowledged: {}", out.stdout);
    ensure!(
        out.stderr.contains("disk full on node 1") && out.stderr.contains("storage_min_free_bytes"),
        "the error names the cause: {}",
        out.stderr
    );
    // The replicated partitions take writes on the other nodes.
    for p in 0..3 {
        c.produce("shared", p, &values(&format!("during-{p}"), 30), &mut acked)?;
    }
    // Node 1 still serves reads of what it holds.
    c.check_replica("solo", 0, 1, 20, &solo)?;
    let out =
        c.ctl(&["consume", "shared", "--partition", "0", "--replica", "1", "--count", "50"], None, t)?;
    ensure!(out.ok() && out.json_lines()?.len() == 50, "node 1 serves reads while full: {}", out.stderr);

    // Space freed: writes resume on node 1, and its replicas catch up with everything.
    std::fs::remove_file(&filler).context("remove the filler")?;
    wait_for("node 1 to take writes again", Duration::from_secs(30), || {
        let out = c.ctl(&["produce", "solo", "--partition", "0"], Some(b"after\n"), t).ok()?;
        out.ok().then_some(())
    })?;
    c.produce("solo", 0, &values("solo-after", 20), &mut solo)?;
    c.check_all_replicas("shared", &acked)?;
    c.check_all_replicas("solo", &solo)?;
    let log = std::fs::read_to_string(&c.node(1).log_path).context("read node 1's log")?;
    ensure!(!log.contains("panicked at"), "node 1 panicked:\n{}", c.log_tail(1, 20));
    drop(c);
    drop(disk);
    Ok(())
}
