//! Nodes on separate network hosts (issue 12, acceptance 1): five nodes, each in a network
//! namespace of its own on one bridge, bound to `0.0.0.0` and advertising their namespace's
//! address; `eddyctl` in a sixth namespace runs the README tour against them: status, a topic,
//! 1,000 events, reads from a follower, the SIGKILL of a partition leader, a new leader, writes
//! after it, and every acknowledged event read back.
//!
//! The namespaces, the bridge and the processes are this test's own and are removed by their
//! handles when it ends, however it ends. Needs root and iproute2 (`ip`), which it installs
//! from Debian when missing; it fails, saying so, where it cannot make namespaces.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::path::PathBuf;
use std::process::Child;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use anyhow::ensure;
use eddy_tests::binary;
use eddy_tests::netns::Net;
use eddy_tests::wait_for;
use serde_json::Value;

const NODES: u64 = 5;
const SUBNET: &str = "10.88.0";

/// A node process, killed by its PID when dropped (`ip netns exec` execs the node, so the PID
/// is the node's).
struct Node {
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn addr(n: u64, port: u16) -> String {
    format!("{SUBNET}.{n}:{port}")
}

/// `eddyctl ARGS` from the client's namespace, with every node as a broker; JSON output.
fn ctl(net: &Net, args: &[&str], stdin: Option<&str>) -> anyhow::Result<(bool, String, String)> {
    use std::io::Write;
    let brokers: Vec<String> = (1..=NODES).map(|n| addr(n, 9091)).collect();
    let mut cmd = net.command(NODES + 1, &binary("eddyctl"));
    cmd.args(["--brokers", &brokers.join(","), "--output", "json"]).args(args);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("run eddyctl in the client namespace")?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn ctl_json(net: &Net, args: &[&str]) -> anyhow::Result<Value> {
    let (ok, stdout, stderr) = ctl(net, args, None)?;
    ensure!(ok, "eddyctl {args:?}: {stderr}");
    Ok(serde_json::from_str(&stdout)?)
}

fn lines(stdout: &str) -> anyhow::Result<Vec<Value>> {
    stdout.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

#[test]
fn five_nodes_on_five_hosts_bound_to_every_interface_and_advertising_their_own() -> anyhow::Result<()> {
    let net = Net::new(NODES + 1, SUBNET)?;
    let dir = tempfile::Builder::new().prefix("eddy-netns-").tempdir()?;
    let mut members = String::new();
    for n in 1..=NODES {
        members.push_str(&format!(
            "[[initial_members]]\nid = {n}\nclient_addr = \"{}\"\nraft_addr = \"{}\"\n",
            addr(n, 9091),
            addr(n, 9191)
        ));
    }
    let mut nodes = Vec::new();
    for n in 1..=NODES {
        let config = dir.path().join(format!("node-{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_id = {n}\ndata_dir = \"{}\"\nclient_addr = \"0.0.0.0:9091\"\nraft_addr = \"0.0.0.0:9191\"\n\
                 http_addr = \"0.0.0.0:9291\"\nadvertised_client_addr = \"{}\"\nadvertised_raft_addr = \"{}\"\n{members}",
                dir.path().join(format!("data-{n}")).display(),
                addr(n, 9091),
                addr(n, 9191),
            ),
        )?;
        let log = dir.path().join(format!("node-{n}.log"));
        let file = std::fs::File::create(&log)?;
        let child = net
            .command(n, &binary("eddy-node"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,openraft=error,h2=warn,hyper=warn,sled=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .context("start eddy-node in its namespace")?;
        nodes.push(Node { child: Some(child), log });
    }
    let tail = |nodes: &[Node]| -> String {
        nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().rev().take(5).collect();
                format!("{}:\n{}", n.log.display(), lines.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Status: every node up, each known by the address it advertises.
    let (ok, _, stderr) = ctl(&net, &["cluster", "health", "--exit-when-healthy", "--timeout", "60s"], None)?;
    ensure!(ok, "the cluster did not become healthy: {stderr}\n{}", tail(&nodes));
    let status = ctl_json(&net, &["cluster", "status"])?;
    let listed = status["nodes"].as_array().context("nodes")?;
    ensure!(listed.len() == NODES as usize, "{status}");
    for node in listed {
        let id = node["id"].as_u64().context("id")?;
        ensure!(
            node["client_addr"] == addr(id, 9091).as_str(),
            "node {id} is known by its advertised address: {node}"
        );
        ensure!(node["up"] == true, "node {id} is up: {node}");
    }

    // A topic, 1,000 events, reads from a follower.
    ctl_json(&net, &["topic", "create", "orders", "--partitions", "3", "--replication-factor", "3"])?;
    let events: String = (1..=1000).map(|i| format!("order-{i}\n")).collect();
    let (ok, stdout, stderr) = ctl(&net, &["produce", "orders", "--partition", "0"], Some(&events))?;
    ensure!(ok, "produce: {stderr}");
    ensure!(lines(&stdout)?.len() == 1000, "1,000 acknowledgements");
    let (ok, stdout, stderr) =
        ctl(&net, &["consume", "orders", "--partition", "0", "--count", "5", "--replica", "follower"], None)?;
    ensure!(ok, "consume from a follower: {stderr}");
    let got = lines(&stdout)?;
    ensure!(got.len() == 5 && got[0]["value"] == "order-1", "{got:?}");

    // SIGKILL the leader of partition 0: a new leader, writes after it, nothing lost.
    let leader_of = |v: &Value| v["partitions"][0]["leader"].as_u64();
    let leader = leader_of(&ctl_json(&net, &["topic", "describe", "orders"])?).context("a leader")?;
    nodes[leader as usize - 1].kill();
    let new_leader = wait_for("a new leader of orders/0", Duration::from_secs(30), || {
        let d = ctl_json(&net, &["topic", "describe", "orders"]).ok()?;
        leader_of(&d).filter(|l| *l != leader)
    })?;
    let more: String = (1..=10).map(|i| format!("after-{i}\n")).collect();
    let (ok, _, stderr) = ctl(&net, &["produce", "orders", "--partition", "0"], Some(&more))?;
    ensure!(ok, "produce after the kill (leader {new_leader}): {stderr}");
    let (ok, stdout, stderr) =
        ctl(&net, &["consume", "orders", "--partition", "0", "--from", "995", "--count", "15"], None)?;
    ensure!(ok, "consume: {stderr}");
    let values: Vec<String> =
        lines(&stdout)?.iter().map(|r| r["value"].as_str().unwrap_or_default().to_owned()).collect();
    let expected: Vec<String> =
        (996..=1000).map(|i| format!("order-{i}")).chain((1..=10).map(|i| format!("after-{i}"))).collect();
    if values != expected {
        bail!("read back {values:?}, expected {expected:?}");
    }
    drop(nodes);
    drop(net);
    Ok(())
}
