//! A harness for tests that run real `eddy-node` processes and drive them with `eddyctl`.
//!
//! [`Cluster`] writes a config per node (ports on 127.0.0.1 picked by the OS, data in a
//! temporary directory), starts the nodes, and can SIGKILL and restart any of them. Every
//! process it starts is killed by its PID when the cluster is dropped, so a failing test leaves
//! nothing running. Waiting is always for a condition with a deadline.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Output;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use serde_json::Value;

/// Builds the workspace's binaries once per test process and returns the path of `name`.
///
/// `cargo test` builds only the binaries of the package under test, and these tests drive the
/// binaries of two other packages, so the harness asks cargo for them (a no-op when fresh).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = built.get_or_insert_with(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "eddy-node", "-p", "eddy-ops", "--bins"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the Eddy binaries");
        assert!(status.success(), "cargo build of the Eddy binaries failed");
        // This test binary lives in target/<profile>/deps.
        let exe = std::env::current_exe().expect("test executable path");
        exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
    });
    dir.join(name)
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Retries `f` until it succeeds, or fails after `timeout` with the last error.
pub fn retry<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("timed out after {timeout:?} waiting for {what}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

pub struct NodeProc {
    pub id: u64,
    pub client_addr: String,
    pub raft_addr: String,
    pub http_addr: String,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl NodeProc {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// The result of an `eddyctl` run.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(self.stdout.trim()).with_context(|| format!("parse eddyctl output: {self:?}"))
    }

    pub fn json_lines(&self) -> anyhow::Result<Vec<Value>> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("parse line {l:?}")))
            .collect()
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
}

impl Cluster {
    /// Writes configs for `n` nodes and starts them all.
    pub fn start(n: u64) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("eddy-cluster-").tempdir()?;
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let p = |_: u16| format!("127.0.0.1:{}", free_port());
            nodes.insert(
                id,
                NodeProc {
                    id,
                    client_addr: p(0),
                    raft_addr: p(1),
                    http_addr: p(2),
                    config_path: dir.path().join(format!("node-{id}.toml")),
                    log_path: dir.path().join(format!("node-{id}.log")),
                    child: None,
                },
            );
        }
        let mut members = String::new();
        for node in nodes.values() {
            members.push_str(&format!(
                "[[initial_members]]\nid = {}\nclient_addr = \"{}\"\nraft_addr = \"{}\"\n",
                node.id, node.client_addr, node.raft_addr
            ));
        }
        for node in nodes.values() {
            let data_dir = dir.path().join(format!("data-{}", node.id));
            let config = format!(
                "node_id = {}\ndata_dir = \"{}\"\nclient_addr = \"{}\"\nraft_addr = \"{}\"\nhttp_addr = \"{}\"\n{members}",
                node.id,
                data_dir.display(),
                node.client_addr,
                node.raft_addr,
                node.http_addr
            );
            std::fs::write(&node.config_path, config)?;
        }
        let mut c = Self { dir, nodes };
        for id in 1..=n {
            c.start_node(id)?;
        }
        Ok(c)
    }

    pub fn brokers(&self) -> String {
        self.nodes.values().map(|n| n.client_addr.as_str()).collect::<Vec<_>>().join(",")
    }

    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[&id]
    }

    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        anyhow::ensure!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log_path)?;
        let child = Command::new(binary("eddy-node"))
            .arg("--config")
            .arg(&node.config_path)
            .env("RUST_LOG", "info,openraft=error,h2=warn,hyper=warn,sled=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start node {id}"))?;
        node.child = Some(child);
        Ok(())
    }

    /// SIGKILL: the node gets no chance to clean up, as in a crash.
    pub fn kill_node(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if let Some(mut child) = node.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for the node to exit; returns whether it did.
    pub fn stop_node(&mut self, id: u64, timeout: Duration) -> anyhow::Result<bool> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        let Some(mut child) = node.child.take() else {
            return Ok(true);
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                child.kill()?;
                child.wait()?;
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tail of a node's log, for failure messages.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[&id].log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `eddyctl --brokers <all> --output json ARGS` with `stdin`, killing it after `timeout`.
    pub fn ctl(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> anyhow::Result<CtlOutput> {
        run_ctl(&self.brokers(), args, stdin, timeout)
    }
}

/// Runs `eddyctl` against `brokers`, killing it (by its PID) if it runs past `timeout`.
pub fn run_ctl(
    brokers: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<CtlOutput> {
    let mut child = Command::new(binary("eddyctl"))
        .arg("--brokers")
        .arg(brokers)
        .arg("--output")
        .arg("json")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start eddyctl")?;
    if let Some(input) = stdin {
        let mut w = child.stdin.take().context("eddyctl stdin")?;
        let input = input.to_vec();
        // Written from a thread so a full pipe cannot deadlock against unread output.
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    let stdout = child.stdout.take().context("eddyctl stdout")?;
    let stderr = child.stderr.take().context("eddyctl stderr")?;
    let out_t = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err_t = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    match status {
        Some(s) => Ok(CtlOutput { code: s.code(), stdout, stderr }),
        None => bail!("eddyctl {args:?} did not finish within {timeout:?}; stderr: {stderr}"),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Output of a command, for messages.
pub fn describe(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
