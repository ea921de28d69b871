//! Operating a cluster, end to end on real `eddy-node` processes driven by `eddyctl`: the dev
//! cluster, joins, partition moves and decommissions under load, refusals, leadership balance,
//! drains, rolling restarts under load, topic changes, metrics and the CLI's conventions.
//!
//! "Under load" means one `eddyctl produce` per partition writing every few milliseconds for
//! the whole operation; each must finish with every event acknowledged and no error, and every
//! acknowledged event must then be on every replica.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::TcpListener;
use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::ensure;
use eddy_tests::Acked;
use eddy_tests::BackgroundProducer;
use eddy_tests::CTL_TIMEOUT;
use eddy_tests::Cluster;
use eddy_tests::CtlOutput;
use eddy_tests::binary;
use eddy_tests::free_base_port;
use eddy_tests::retry;
use eddy_tests::run_ctl;
use eddy_tests::run_eddyctl;
use eddy_tests::values;
use eddy_tests::wait_for;
use serde_json::Value;

const TOPIC: &str = "orders";
/// One event per partition every this often, while an operation runs.
const LOAD_INTERVAL: Duration = Duration::from_millis(5);
const LONG: Duration = Duration::from_secs(180);

fn ctl(c: &Cluster, args: &[&str]) -> anyhow::Result<CtlOutput> {
    c.ctl(args, None, CTL_TIMEOUT)
}

fn ctl_ok(c: &Cluster, args: &[&str]) -> anyhow::Result<Value> {
    let out = ctl(c, args)?;
    ensure!(out.ok(), "eddyctl {args:?} failed: {out:?}");
    out.json()
}

/// Runs `scenario` on a fresh cluster of `n` nodes; on failure prints the nodes' log tails.
fn with_cluster(n: u64, scenario: impl FnOnce(&mut Cluster) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut c = Cluster::start(n)?;
    let result = wait_until_up(&c, n as usize).and_then(|()| scenario(&mut c));
    if result.is_err() {
        for id in c.nodes.keys() {
            eprintln!("--- node {id} log tail ---\n{}", c.log_tail(*id, 40));
        }
    }
    result
}

fn wait_until_up(c: &Cluster, n: usize) -> anyhow::Result<()> {
    wait_for("every node up", Duration::from_secs(30), || {
        let v = ctl(c, &["cluster", "status"]).ok()?.json().ok()?;
        let nodes = v["nodes"].as_array()?;
        (nodes.len() == n && nodes.iter().all(|n| n["up"] == true)).then_some(())
    })
}

fn create_topic(c: &Cluster, name: &str, partitions: u32, rf: usize) -> anyhow::Result<Value> {
    ctl_ok(
        c,
        &[
            "topic",
            "create",
            name,
            "--partitions",
            &partitions.to_string(),
            "--replication-factor",
            &rf.to_string(),
        ],
    )?;
    c.wait_for_leaders(name, rf)
}

fn replicas_of(topic: &Value, p: usize) -> anyhow::Result<Vec<u64>> {
    let r = topic["partitions"][p]["replicas"].as_array().context("replicas")?;
    Ok(r.iter().filter_map(Value::as_u64).collect())
}

/// Leaders per node (nodes leading nothing included), from `node list`.
fn leader_counts(c: &Cluster) -> anyhow::Result<BTreeMap<u64, u64>> {
    let nodes = c.node_list()?;
    nodes.iter().map(|(id, n)| Ok((*id, n["leaders"].as_u64().context("leaders")?))).collect()
}

fn spread(counts: &BTreeMap<u64, u64>) -> u64 {
    counts.values().max().unwrap_or(&0) - counts.values().min().unwrap_or(&0)
}

fn health(c: &Cluster, timeout: &str) -> anyhow::Result<CtlOutput> {
    let out = c.ctl(
        &["cluster", "health", "--exit-when-healthy", "--timeout", timeout],
        None,
        Duration::from_secs(120),
    )?;
    Ok(out)
}

fn ensure_healthy(c: &Cluster) -> anyhow::Result<()> {
    let out = health(c, "60s")?;
    ensure!(out.ok(), "the cluster did not become healthy: {out:?}");
    Ok(())
}

/// Starts one background producer per partition.
fn load(c: &Cluster, partitions: u32, prefix: &str) -> anyhow::Result<Vec<BackgroundProducer>> {
    (0..partitions)
        .map(|p| c.background_producer(TOPIC, p, &format!("{prefix}-p{p}"), LOAD_INTERVAL))
        .collect()
}

/// Stops the producers; each must have had every event acknowledged without an error.
fn stop_load(
    producers: Vec<BackgroundProducer>,
    acked: &mut Acked,
) -> anyhow::Result<Vec<eddy_tests::ProduceReport>> {
    let mut reports = Vec::new();
    for p in producers {
        let r = p.stop(Duration::from_secs(60))?;
        r.ensure_clean()?;
        ensure!(!r.acks.is_empty(), "the producer of partition {} had nothing acknowledged", r.partition);
        r.record(acked)?;
        reports.push(r);
    }
    Ok(reports)
}

/// Waits until every producer has had at least `n` more acknowledgements than now; proves
/// that load is flowing before and after an operation.
fn wait_for_progress(producers: &[BackgroundProducer], n: usize) -> anyhow::Result<()> {
    let start: Vec<usize> = producers.iter().map(BackgroundProducer::acked).collect();
    wait_for("the producers to make progress", Duration::from_secs(30), || {
        producers.iter().zip(&start).all(|(p, s)| p.acked() >= s + n).then_some(())
    })
}

// ------------------------------------------------------------------ dev ---

/// `eddy-node dev` as a child process, interrupted (Ctrl-C) and reaped when dropped.
struct Dev {
    child: Child,
    brokers: String,
    /// What dev printed as `export EDDY_…=…` lines (the CA and the superuser's certificate).
    env: Vec<(String, String)>,
    data_dir: std::path::PathBuf,
}

impl Dev {
    fn start(data_dir: &Path, base_port: u16) -> anyhow::Result<Self> {
        let mut child = Command::new(binary("eddy-node"))
            .args(["dev", "--nodes", "3", "--base-port", &base_port.to_string(), "--data-dir"])
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start eddy-node dev")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // The thread ends when dev exits and closes its stdout.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("Press Ctrl-C") {
                    let _ = tx.send(None);
                } else {
                    let _ = tx.send(Some(line));
                }
            }
        });
        let mut dev = Self { child, brokers: String::new(), env: Vec::new(), data_dir: data_dir.to_owned() };
        loop {
            let line = rx.recv_timeout(Duration::from_secs(30)).context("eddy-node dev stopped printing")?;
            let Some(line) = line else { break };
            if let Some(b) = line.strip_prefix("brokers: ") {
                dev.brokers = b.to_owned();
            }
            if let Some((k, v)) = line.trim().strip_prefix("export ").and_then(|kv| kv.split_once('=')) {
                dev.env.push((k.to_owned(), v.to_owned()));
            }
        }
        ensure!(!dev.brokers.is_empty(), "eddy-node dev printed no brokers line");
        Ok(dev)
    }

    /// `eddyctl --output json ARGS` with only what dev printed to export (no --brokers).
    fn ctl(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> anyhow::Result<CtlOutput> {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_eddyctl(&full, &env, stdin, timeout)
    }

    /// The last `n` lines (above debug) of every node's log (dev keeps them beside the data).
    fn log_tail(&self, n: usize) -> String {
        (1..=3)
            .map(|i| {
                let path = self.data_dir.join(format!("node-{i}.log"));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().filter(|l| !l.contains(" DEBUG ")).collect();
                format!("--- {}\n{}", path.display(), lines[lines.len().saturating_sub(n)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Ctrl-C; returns how long the dev cluster took to exit, and its status.
    fn interrupt(&mut self, timeout: Duration) -> anyhow::Result<(Duration, std::process::ExitStatus)> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        let t = Instant::now();
        let status = wait_for("eddy-node dev to exit", timeout, || self.child.try_wait().ok().flatten())?;
        Ok((t.elapsed(), status))
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.interrupt(Duration::from_secs(30));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A base port whose nine dev ports (client, Raft, HTTP of three nodes) are all free, below
/// the ephemeral range (see [`free_base_port`]).
fn free_dev_base_port() -> u16 {
    free_base_port(&DEV_PORT_OFFSETS)
}

/// Where `eddy-node dev` puts the client, Raft and HTTP ports of its three nodes.
const DEV_PORT_OFFSETS: [u16; 9] = [0, 1, 2, 100, 101, 102, 200, 201, 202];

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn dev_cluster_is_healthy_stops_on_ctrl_c_and_resumes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let result = dev_stops_and_resumes(&dir.path().join("dev"));
    if result.is_err() {
        // The nodes' logs are the evidence; keep them.
        eprintln!("dev's data and logs are kept in {}", dir.keep().display());
    }
    result
}

fn dev_stops_and_resumes(data: &Path) -> anyhow::Result<()> {
    let base = free_dev_base_port();
    let mut dev = Dev::start(data, base)?;
    let expected: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    ensure!(dev.brokers == expected.join(","), "dev printed brokers {:?}", dev.brokers);
    let exported: Vec<&str> = dev.env.iter().map(|(k, _)| k.as_str()).collect();
    ensure!(
        exported == ["EDDY_BROKERS", "EDDY_CA", "EDDY_CERT", "EDDY_KEY", "KCAT_CONFIG"],
        "dev exports {exported:?}: a TLS cluster and its superuser's certificate by default"
    );
    let out = dev.ctl(&["user", "whoami"], None, CTL_TIMEOUT)?;
    ensure!(out.ok() && out.json()?["principal"] == "User:admin", "the exported credentials: {out:?}");
    let plain = run_ctl(&dev.brokers, &["--request-timeout", "3s", "topic", "list"], None, CTL_TIMEOUT)?;
    ensure!(!plain.ok() && plain.stderr.contains("requires TLS"), "plaintext to dev: {plain:?}");

    let health = ["cluster", "health", "--exit-when-healthy", "--timeout", "40s"];
    let out = dev.ctl(&health, None, Duration::from_secs(60))?;
    ensure!(out.ok(), "the dev cluster is not healthy: {out:?}\ndev's log:\n{}", dev.log_tail(80));
    // One line per look until healthy; the last is the verdict.
    let json = out.json_lines()?.pop().context("health printed nothing")?;
    ensure!(json["healthy"] == true && json["metadata_quorum"] == true, "health says {json}");

    let create = ["topic", "create", TOPIC, "--partitions", "1", "--replication-factor", "3"];
    let out = dev.ctl(&create, None, CTL_TIMEOUT)?;
    ensure!(out.ok(), "topic create failed: {out:?}");
    let events = values("dev", 10);
    let input: String = events.iter().map(|v| format!("{v}\n")).collect();
    let produce = ["produce", TOPIC, "--partition", "0"];
    let out = retry("a produce to the new topic", Duration::from_secs(30), || {
        let out = dev.ctl(&produce, Some(input.as_bytes()), CTL_TIMEOUT)?;
        ensure!(out.ok(), "produce failed: {out:?}");
        Ok(out)
    })?;
    ensure!(out.json_lines()?.len() == events.len());

    let (took, status) = dev.interrupt(Duration::from_secs(20))?;
    eprintln!("eddy-node dev stopped {took:?} after Ctrl-C");
    ensure!(status.success(), "eddy-node dev exited with {status}");
    for port in DEV_PORT_OFFSETS.map(|o| base + o) {
        ensure!(port_is_free(port), "a node still holds port {port} after dev exited");
    }

    // Again, on the same data: the topic and its events are still there.
    let dev = Dev::start(data, base)?;
    let out = dev.ctl(&health, None, Duration::from_secs(60))?;
    ensure!(out.ok(), "the resumed dev cluster is not healthy: {out:?}\ndev's log:\n{}", dev.log_tail(80));
    let consume = ["consume", TOPIC, "--partition", "0", "--count", "10"];
    let out = retry("the events produced before the restart", Duration::from_secs(30), || {
        let out = dev.ctl(&consume, None, CTL_TIMEOUT)?;
        ensure!(out.ok(), "consume failed: {out:?}");
        Ok(out)
    })?;
    let got: Vec<String> =
        out.json_lines()?.iter().filter_map(|r| r["value"].as_str().map(str::to_owned)).collect();
    ensure!(got == events, "after a restart of dev the partition holds {got:?}");
    Ok(())
}

// ---------------------------------------------------- join, move, cancel ---

#[test]
fn a_joined_node_takes_a_partition_moved_under_load() -> anyhow::Result<()> {
    with_cluster(3, |c| {
        create_topic(c, TOPIC, 3, 3)?;

        // A fourth node with `join` becomes an active member.
        let t = Instant::now();
        c.join_node(4)?;
        wait_for("node 4 to be listed as active", Duration::from_secs(40), || {
            let nodes = c.node_list().ok()?;
            (nodes.get(&4)?["state"] == "active").then_some(())
        })?;
        eprintln!("node 4 active {:?} after it started", t.elapsed());
        let nodes = c.node_list()?;
        ensure!(nodes[&4]["metadata_voter"] == true, "with 4 nodes, all are metadata voters: {nodes:?}");

        // Move partition 0 from 1,2,3 to 2,3,4 while every partition takes writes.
        let mut acked = Acked::new();
        c.produce(TOPIC, 0, &values("before-move", 200), &mut acked)?;
        let producers = load(c, 3, "move")?;
        wait_for_progress(&producers, 20)?;
        let out = c.ctl(&["partition", "move", "orders/0", "--replicas", "2,3,4", "--wait"], None, LONG)?;
        ensure!(out.ok(), "the move failed: {out:?}");
        ensure!(out.json()?["done"] == true, "the move did not complete: {out:?}");
        wait_for_progress(&producers, 20)?;
        stop_load(producers, &mut acked)?;

        let topic = c.describe(TOPIC)?;
        let mut replicas = replicas_of(&topic, 0)?;
        ensure!(replicas[0] == 2, "the first replica given is the preferred leader: {replicas:?}");
        replicas.sort_unstable();
        ensure!(replicas == vec![2, 3, 4], "partition 0 is on {replicas:?}");
        let checked = c.check_all_replicas(TOPIC, &acked)?;
        ensure!(checked[&0] == vec![2, 3, 4], "checked {checked:?}");
        let moves = ctl_ok(c, &["partition", "move-status"])?;
        ensure!(moves["moves"].as_array().is_some_and(Vec::is_empty), "moves left: {moves}");

        // A move that cannot finish (its new replica is down) shows in move-status and can be
        // cancelled; the partition stays where it was and keeps working.
        c.kill_node(4)?;
        let before = replicas_of(&c.describe(TOPIC)?, 1)?;
        let target: Vec<u64> = before.iter().take(2).copied().chain([4]).collect();
        let target_arg = target.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        ctl_ok(c, &["partition", "move", "orders/1", "--replicas", &target_arg])?;
        let moves = ctl_ok(c, &["partition", "move-status"])?;
        let listed = moves["moves"].as_array().context("moves")?;
        ensure!(listed.len() == 1 && listed[0]["partition"] == 1, "move-status shows {moves}");
        let cancelled = ctl_ok(c, &["partition", "move-cancel", "orders/1"])?;
        ensure!(cancelled["cancelled"] == true, "move-cancel said {cancelled}");
        let moves = ctl_ok(c, &["partition", "move-status"])?;
        ensure!(moves["moves"].as_array().is_some_and(Vec::is_empty), "moves left after cancel: {moves}");
        wait_for("partition 1 back on its replicas, without learners", Duration::from_secs(30), || {
            (replicas_of(&c.describe(TOPIC).ok()?, 1).ok()? == before).then_some(())
        })?;
        c.produce(TOPIC, 1, &values("after-cancel", 50), &mut acked)?;
        let out = ctl(c, &["partition", "move-cancel", "orders/1"])?;
        ensure!(out.code == Some(1) && out.stderr.contains("no move"), "a second cancel: {out:?}");
        c.start_node(4)?;
        ensure_healthy(c)?;
        c.check_all_replicas(TOPIC, &acked)?;
        Ok(())
    })
}

// -------------------------------------------------------- decommission ---

#[test]
fn decommission_under_load_then_a_refused_one() -> anyhow::Result<()> {
    with_cluster(4, |c| {
        create_topic(c, TOPIC, 3, 3)?;
        let held = c.node_list()?[&1]["replicas"].as_u64().context("replicas")?;
        ensure!(held > 0, "node 1 should hold replicas before its decommission");

        let mut acked = Acked::new();
        let producers = load(c, 3, "decommission")?;
        wait_for_progress(&producers, 20)?;
        let out = c.ctl(&["node", "decommission", "1", "--wait", "--timeout", "150s"], None, LONG)?;
        ensure!(out.ok(), "the decommission failed: {out:?}");
        ensure!(out.json()?["done"] == true, "the decommission did not finish: {out:?}");
        wait_for_progress(&producers, 20)?;
        stop_load(producers, &mut acked)?;

        let nodes = c.node_list()?;
        if let Some(n) = nodes.get(&1) {
            ensure!(n["replicas"] == 0 && n["leaders"] == 0, "node 1 still holds something: {n}");
            ensure!(n["state"] == "decommissioning" || n["state"] == "removed", "node 1 is {n}");
        }
        let topic = c.describe(TOPIC)?;
        for p in 0..3 {
            let r = replicas_of(&topic, p)?;
            ensure!(r.len() == 3 && !r.contains(&1), "partition {p} is on {r:?}");
        }
        c.check_all_replicas(TOPIC, &acked)?;
        // Only nodes 2-4 are expected now: node 1 leaves the cluster once it holds nothing.
        wait_for("node 1 to be removed", Duration::from_secs(60), || {
            let n = c.node_list().ok()?;
            n.get(&1).is_none_or(|n| n["state"] == "removed").then_some(())
        })?;
        // Node 1 still runs, and its own metadata stopped before its removal: asked alone, it
        // must not list itself as still decommissioning (an operator waiting for `removed`
        // would wait for good); it answers that its metadata is not current.
        let alone = eddy_tests::run_ctl(&c.nodes[&1].client_addr, &["node", "list"], None, CTL_TIMEOUT)?;
        if alone.ok() {
            let me =
                alone.json()?["nodes"].as_array().and_then(|ns| ns.iter().find(|n| n["id"] == 1).cloned());
            ensure!(me.as_ref().is_none_or(|n| n["state"] == "removed"), "node 1 lists itself as {me:?}");
        } else {
            // Its last answer, or the client's deadline cutting the last one-second wait.
            ensure!(
                alone.stderr.contains("not confirmed current")
                    || alone.stderr.contains("did not answer in time"),
                "node 1's refusal: {}",
                alone.stderr
            );
        }
        // Nor may it answer questions about placement from the view it last applied once the
        // cluster's metadata has moved on (they are answered from a view confirmed current
        // within 5 s): a topic created now, node 1 never hears of it; asked alone, it soon
        // refuses, naming why.
        create_topic(c, "after-removal", 1, 3)?;
        wait_for("node 1, removed, to refuse to describe the topic", Duration::from_secs(60), || {
            let out = eddy_tests::run_ctl(
                &c.nodes[&1].client_addr,
                &["topic", "describe", TOPIC],
                None,
                CTL_TIMEOUT,
            )
            .ok()?;
            (!out.ok() && out.stderr.contains("has not been confirmed current")).then_some(())
        })?;
        ensure_healthy(c)?;

        // Three nodes left, an RF3 topic: nowhere for node 2's replicas to go.
        let t = Instant::now();
        let out = c.ctl(&["node", "decommission", "2"], None, Duration::from_secs(30))?;
        ensure!(out.code == Some(1), "decommissioning node 2 should be refused: {out:?}");
        ensure!(
            out.stderr.contains("cannot decommission node 2") && out.stderr.contains("replication factor"),
            "the refusal should say why and what to do: {}",
            out.stderr
        );
        ensure!(t.elapsed() < Duration::from_secs(20), "the refusal took {:?}", t.elapsed());
        let n2 = &c.node_list()?[&2];
        ensure!(n2["state"] == "active", "a refused decommission changes nothing: {n2}");
        Ok(())
    })
}

// ------------------------------------------------- leadership balance ---

#[test]
fn leaders_rebalance_after_a_node_returns() -> anyhow::Result<()> {
    with_cluster(3, |c| {
        let topic = "events";
        create_topic(c, topic, 6, 3)?;
        wait_for("balanced leaders at start", Duration::from_secs(30), || {
            (spread(&leader_counts(c).ok()?) <= 1).then_some(())
        })?;

        c.kill_node(1)?;
        wait_for("every partition led by a live node", Duration::from_secs(30), || {
            let t = c.describe(topic).ok()?;
            let parts = t["partitions"].as_array()?;
            parts.iter().all(|p| p["leader"].as_u64().is_some_and(|l| l != 1)).then_some(())
        })?;
        let out = c.ctl(&["cluster", "health"], None, CTL_TIMEOUT)?;
        ensure!(out.code == Some(3), "health with a node down must exit 3: {out:?}");
        ensure!(out.json()?["nodes_down"] == serde_json::json!([1]), "health: {}", out.stdout);

        c.start_node(1)?;
        let t = Instant::now();
        let counts = wait_for("leaders to spread evenly again", Duration::from_secs(60), || {
            let counts = leader_counts(c).ok()?;
            (counts.len() == 3 && counts[&1] > 0 && spread(&counts) <= 1).then_some(counts)
        })?;
        eprintln!("leaders balanced {:?} after node 1 restarted: {counts:?}", t.elapsed());
        let out = c.ctl(&["cluster", "balance", "--wait"], None, LONG)?;
        ensure!(out.ok(), "cluster balance --wait on a balanced cluster: {out:?}");
        ensure_healthy(c)?;

        // A manual transfer sticks: it makes the target the preferred leader.
        let before = c.describe(topic)?;
        let leader = before["partitions"][0]["leader"].as_u64().context("leader")?;
        let to = replicas_of(&before, 0)?.into_iter().find(|r| *r != leader).context("another replica")?;
        let out =
            ctl_ok(c, &["partition", "transfer-leadership", &format!("{topic}/0"), "--to", &to.to_string()])?;
        ensure!(out["leader"] == to, "transfer-leadership said {out}");
        ensure!(replicas_of(&c.describe(topic)?, 0)?[0] == to, "node {to} should now be preferred");
        let out = ctl_ok(c, &["cluster", "balance", "--wait"])?;
        ensure!(out["leaders_not_preferred"] == 0, "balance: {out}");
        ensure!(c.describe(topic)?["partitions"][0]["leader"] == to, "balancing undid the transfer");
        let out = ctl(c, &["partition", "transfer-leadership", &format!("{topic}/0"), "--to", "9"])?;
        ensure!(out.code == Some(1) && out.stderr.contains("to_node"), "transfer to a non-replica: {out:?}");

        // Drain: node 2 gives up its leaderships and gets none while in maintenance.
        let out = ctl_ok(c, &["node", "drain", "2"])?;
        ensure!(out["node"]["state"] == "draining", "drain said {out}");
        wait_for("node 2 to lead nothing", Duration::from_secs(30), || {
            (leader_counts(c).ok()?[&2] == 0).then_some(())
        })?;
        let out = ctl(c, &["partition", "transfer-leadership", &format!("{topic}/0"), "--to", "2"])?;
        ensure!(
            out.code == Some(1) && out.stderr.contains("draining"),
            "a transfer to a draining node: {out:?}"
        );
        let out = ctl_ok(c, &["node", "undrain", "2"])?;
        ensure!(out["node"]["state"] == "active", "undrain said {out}");
        // Back on its preferred leaderships (the transfer above made the preference uneven).
        wait_for("node 2 to lead again", Duration::from_secs(60), || {
            let health = ctl(c, &["cluster", "health"]).ok()?.json().ok()?;
            (leader_counts(c).ok()?[&2] > 0 && health["leaders_not_preferred"] == 0).then_some(())
        })
        .with_context(|| format!("leaders: {:?}; {:?}", leader_counts(c), c.describe(topic)))?;
        Ok(())
    })
}

// ---------------------------------------------------- rolling restart ---

#[test]
fn rolling_restart_under_load_loses_nothing() -> anyhow::Result<()> {
    with_cluster(3, |c| roll_under_load(c, "rolling", false))
}

/// The revision a rolling upgrade starts from: the last one before this build's stored formats
/// or wire protocol changed (move it forward at each release). `EDDY_UPGRADE_FROM` names another.
const UPGRADE_FROM: &str = "e2b3f3ae45d8c1dae487f5373aaa691e36af1033";

/// The README's upgrade procedure (issue 12, acceptance 6, second half): a cluster of the
/// earlier revision's `eddy-node`, built from git, is upgraded one node at a time (SIGTERM,
/// this build's binary, start, healthy) under load: old and new nodes replicate together, the
/// new ones read the old ones' data directories, and every acknowledged event is on every
/// replica afterwards.
#[test]
fn rolling_upgrade_from_the_previous_revision_under_load_loses_nothing() -> anyhow::Result<()> {
    let rev = std::env::var("EDDY_UPGRADE_FROM").unwrap_or_else(|_| UPGRADE_FROM.to_owned());
    let earlier = eddy_tests::earlier_build(&rev)?;
    let mut c = Cluster::start_on(3, &earlier)?;
    let result = wait_until_up(&c, 3).and_then(|()| roll_under_load(&mut c, "upgrade", true));
    if result.is_err() {
        for id in c.nodes.keys() {
            eprintln!("--- node {id} log tail ---\n{}", c.log_tail(*id, 40));
        }
    }
    result
}

/// Stops each node in turn with SIGTERM (it must hand its leaderships over) and starts it again,
/// on this build's binary when `upgrade`, while one producer per partition writes; every
/// acknowledged event must then be on every replica.
fn roll_under_load(c: &mut Cluster, prefix: &str, upgrade: bool) -> anyhow::Result<()> {
    {
        create_topic(c, TOPIC, 3, 3)?;
        ensure_healthy(c)?;
        let mut acked = Acked::new();
        let producers = load(c, 3, prefix)?;
        wait_for_progress(&producers, 20)?;
        let mut steps = Vec::new();
        for id in 1..=3 {
            let from = Instant::now();
            let stopped = c.stop_node(id, Duration::from_secs(20))?;
            ensure!(stopped, "node {id} did not stop within 20 s of SIGTERM");
            let stop_took = from.elapsed();
            let log = c.log_tail(id, 20);
            ensure!(
                log.contains("leaderships handed over"),
                "node {id} stopped without handing over:\n{log}"
            );
            if upgrade {
                c.set_binary(id, None)?;
            }
            c.start_node(id)?;
            ensure_healthy(c)?;
            // Healthy means leaders are back on their preferred replicas: a second hand-over.
            wait_for_progress(&producers, 20)?;
            steps.push((id, from, Instant::now(), stop_took));
        }
        let reports = stop_load(producers, &mut acked)?;
        for (id, from, to, stop_took) in &steps {
            let gaps: Vec<String> =
                reports.iter().map(|r| format!("p{} {:?}", r.partition, r.longest_gap(*from, *to))).collect();
            eprintln!(
                "{prefix} of node {id}: SIGTERM to exit {stop_took:?}; longest wait for an ack per partition: {}",
                gaps.join(", ")
            );
        }
        let checked = c.check_all_replicas(TOPIC, &acked)?;
        let events: usize = acked.values().map(BTreeMap::len).sum();
        eprintln!(
            "{prefix}: {events} acknowledged events, all on every replica (partition -> replicas: {checked:?})"
        );
        Ok(())
    }
}

// ------------------------------------------- topics, metrics, the CLI ---

#[test]
fn topic_changes_metrics_and_cli_conventions() -> anyhow::Result<()> {
    with_cluster(3, |c| {
        // Create with a setting, alter it, refuse an unknown one.
        let out = ctl_ok(
            c,
            &[
                "topic",
                "create",
                "t1",
                "--partitions",
                "2",
                "--replication-factor",
                "3",
                "--config",
                "max.event.bytes=1000",
            ],
        )?;
        ensure!(out["config"]["max.event.bytes"] == "1000", "create said {out}");
        c.wait_for_leaders("t1", 3)?;
        let mut acked = Acked::new();
        let out = c.ctl(&["produce", "t1", "--partition", "0"], Some(&[b'x'; 1500]), CTL_TIMEOUT)?;
        ensure!(!out.ok() && out.stderr.contains("1000"), "a 1500 B event in a 1000 B topic: {out:?}");
        let out = ctl_ok(c, &["topic", "alter-config", "t1", "--set", "max.event.bytes=4096"])?;
        ensure!(out["config"]["max.event.bytes"] == "4096", "alter-config said {out}");
        let big = "y".repeat(1500);
        c.produce("t1", 0, &[big], &mut acked)?;
        let out = ctl(c, &["topic", "alter-config", "t1", "--set", "colour=blue"])?;
        ensure!(out.code == Some(1) && out.stderr.contains("colour"), "an unknown setting: {out:?}");

        // Grow, then delete.
        let out = ctl_ok(c, &["topic", "add-partitions", "t1", "--count", "2"])?;
        ensure!(out["partitions"] == 4, "add-partitions said {out}");
        c.wait_for_leaders("t1", 3)?;
        c.produce("t1", 3, &values("new-partition", 10), &mut acked)?;
        c.check_all_replicas("t1", &acked)?;
        let list = ctl_ok(c, &["topic", "list"])?;
        ensure!(list["topics"][0]["name"] == "t1" && list["topics"][0]["partitions"] == 4, "list: {list}");
        // Deleted while node 3 is down: when it returns, it removes the topic's partition
        // directories too (every node holds every partition here, so its directories come to
        // match node 1's).
        let (groups_1, groups_3) = (c.data_dir(1).join("groups"), c.data_dir(3).join("groups"));
        let groups = |dir: &Path| -> anyhow::Result<Vec<String>> {
            let mut names: Vec<String> = std::fs::read_dir(dir)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            names.sort();
            Ok(names)
        };
        let before = groups(&groups_3)?;
        c.kill_node(3)?;
        ctl_ok(c, &["topic", "delete", "t1"])?;
        let list = ctl_ok(c, &["topic", "list"])?;
        ensure!(list["topics"].as_array().is_some_and(Vec::is_empty), "after delete: {list}");
        c.start_node(3)?;
        ensure_healthy(c)?;
        let remaining =
            wait_for("node 3 to remove the deleted topic's directories", Duration::from_secs(30), || {
                let (mine, theirs) = (groups(&groups_3).ok()?, groups(&groups_1).ok()?);
                (mine == theirs).then_some(mine)
            })?;
        ensure!(
            remaining.len() + 4 <= before.len(),
            "t1's 4 partitions are gone: {before:?} → {remaining:?}"
        );
        let out = ctl(c, &["topic", "describe", "t1"])?;
        ensure!(out.code == Some(1) && out.stderr.contains("does not exist"), "describe deleted: {out:?}");
        let out = ctl(c, &["topic", "delete", "t1"])?;
        ensure!(out.code == Some(1) && out.stderr.contains("does not exist"), "delete twice: {out:?}");

        // Traffic for the metrics below.
        let mut acked = Acked::new();
        create_topic(c, TOPIC, 1, 3)?;
        c.produce(TOPIC, 0, &values("metrics", 100), &mut acked)?;
        let hw = c.high_watermark(TOPIC, 0, &acked)?;
        c.check_replica(TOPIC, 0, 2, hw, &acked)?;

        // /metrics is Prometheus text with every family operators need: node-wide families on
        // every node, per-partition ones on the nodes that hold (or lead) a partition.
        let everywhere = [
            "eddy_produce_requests",
            "eddy_produce_latency_seconds",
            "eddy_fetch_requests",
            "eddy_fetch_latency_seconds",
            "eddy_raft_commit_latency_seconds",
            "eddy_fsync_latency_seconds",
            "eddy_meta_apply_latency_seconds",
            "eddy_node_leaders",
            "eddy_node_replicas",
            "eddy_under_replicated_partitions",
            "eddy_replicas_damaged",
            "eddy_node_ready",
        ];
        let somewhere = ["eddy_partition_replication_lag", "eddy_partition_segment_bytes"];
        let has = |scrape: &prometheus_parse::Scrape, family: &str| {
            scrape.docs.contains_key(family) || scrape.samples.iter().any(|s| s.metric.starts_with(family))
        };
        let mut produced = 0.0;
        let mut scrapes = Vec::new();
        for id in 1..=3 {
            let (status, body) = c.http_get(id, "/metrics")?;
            ensure!(status == 200, "/metrics on node {id}: {status}");
            let lines = body.lines().map(|l| Ok(l.to_owned()));
            let scrape = prometheus_parse::Scrape::parse(lines).context("parse /metrics")?;
            for family in everywhere {
                ensure!(has(&scrape, family), "node {id}: /metrics lacks {family}:\n{body}");
            }
            for s in &scrape.samples {
                // prometheus-parse types samples by their exact name, and the TYPE line names
                // the family without `_total`, so a counter sample reads as untyped.
                if s.metric == "eddy_produce_records_total"
                    && let prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) = s.value
                {
                    produced += v;
                }
            }
            scrapes.push(scrape);
            let (status, body) = c.http_get(id, "/health")?;
            ensure!(status == 200, "/health on node {id}: {status} {body}");
        }
        for family in somewhere {
            ensure!(scrapes.iter().any(|s| has(s, family)), "no node's /metrics has {family}");
        }
        ensure!(produced >= 100.0, "the nodes count {produced} produced records, expected at least 100");

        // The CLI: tables by default, usage errors exit 2, completions, benches.
        let brokers = c.brokers();
        let out =
            run_eddyctl(&["--brokers", &brokers, "node", "list"], &[("NO_COLOR", "1")], None, CTL_TIMEOUT)?;
        ensure!(out.ok() && out.stdout.contains("STATE") && !out.stdout.contains('\u{1b}'), "table: {out:?}");
        let out = run_eddyctl(&["topic", "create"], &[], None, CTL_TIMEOUT)?;
        ensure!(out.code == Some(2) && out.stderr.contains("Usage"), "a usage error: {out:?}");
        for shell in ["bash", "zsh", "fish"] {
            let out = run_eddyctl(&["completion", shell], &[], None, CTL_TIMEOUT)?;
            ensure!(out.ok() && out.stdout.contains("partition"), "completion {shell}: {out:?}");
        }
        let plot = c.dir.path().join("latency.svg");
        let plot_arg = plot.to_str().context("path")?;
        let benches: [&[&str]; 3] = [
            &["bench", "produce", "--events", "2000", "--size", "64", "--inflight", "16"],
            // Consume reads what produce wrote; latency starts over with a fresh topic.
            &["bench", "consume", "--events", "2000"],
            &["bench", "latency", "--rate", "200", "--seconds", "2", "--size", "64", "--plot", plot_arg],
        ];
        for args in benches {
            let out = c.ctl(args, None, LONG)?;
            ensure!(out.ok(), "{args:?}: {out:?}");
            let v = out.json()?;
            let n = if v["bench"] == "consume" { v["events"].as_u64() } else { v["ack"]["count"].as_u64() };
            let n = n.context("a count of events")?;
            ensure!(n >= 400, "{args:?} measured {n} events: {v}");
            ensure!(v["events_per_sec"].as_f64().is_none_or(|r| r > 0.0), "{args:?}: {v}");
        }
        let svg = std::fs::read_to_string(&plot)?;
        ensure!(svg.contains("<svg"), "--plot wrote {} bytes that are not SVG", svg.len());
        // Two groups of two members over the one-partition topic: the member owning it commits
        // every tick, the other owns nothing and commits nothing.
        let args = ["bench", "groups", "--topic", TOPIC, "--groups", "2", "--members", "2"];
        let out =
            c.ctl(&[&args[..], &["--duration", "2s", "--commit-every", "250ms"]].concat(), None, LONG)?;
        ensure!(out.ok(), "bench groups: {out:?}");
        let v = out.json()?;
        ensure!(v["commit_failures"].as_u64() == Some(0), "bench groups: {v}");
        let commits = v["commits"].as_u64().context("a count of commits")?;
        ensure!((4..=18).contains(&commits), "bench groups: {commits} commits by 2 owners over 8 ticks: {v}");
        Ok(())
    })
}
