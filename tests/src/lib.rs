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
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

pub mod netns;

use anyhow::Context;
use anyhow::bail;
use anyhow::ensure;
use serde_json::Value;

/// Builds the workspace's binaries once per test process and returns the path of `name`.
///
/// `cargo test` builds only the binaries of the package under test, and these tests drive the
/// binaries of two other packages, so the harness asks cargo for them (a no-op when fresh). It
/// asks for the workspace's tests too: with them cargo resolves features as `cargo test
/// --workspace` does (dev-dependencies enable tokio's `test-util`, the simulator eddy-node's
/// `planted-bugs`), so after the README's test command has built everything this builds
/// nothing, where building the binaries alone rebuilt tokio and all that uses it (CI: 100 s).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = built.get_or_insert_with(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--workspace", "--bins", "--tests"]);
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

/// The `eddy-node` of an earlier revision of this repository, built from its git history, for
/// upgrade tests. Built once per revision into `target/upgrade-REV/` (its source exported there
/// with `git archive`), starting from a hard-linked copy of this build's `target/<profile>` so
/// that only the workspace's own crates compile (about two minutes instead of ten). Fails,
/// saying why, when the checkout has no git history back to `rev` (a shallow clone).
pub fn earlier_build(rev: &str) -> anyhow::Result<PathBuf> {
    // A build takes both cores for a minute and more: never beside a cluster (see `alone`).
    let _alone = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let profile_dir = binary("eddy-node").parent().context("target/<profile>")?.to_path_buf();
    let profile = profile_dir.file_name().context("profile name")?.to_owned();
    let root = profile_dir.parent().context("target")?.join(format!("upgrade-{rev}"));
    let built = root.join(&profile).join("eddy-node");
    if built.is_file() {
        return Ok(built);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("repository root")?;
    let src = root.join("src");
    if !src.join("Cargo.toml").is_file() {
        std::fs::create_dir_all(&src)?;
        let archive = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["archive", "--format=tar", rev])
            .stdout(Stdio::piped())
            .spawn()
            .context("run git archive (is git installed?)")?;
        let untar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&src)
            .stdin(archive.stdout.context("git archive's output")?)
            .status()
            .context("run tar")?;
        ensure!(
            untar.success() && src.join("Cargo.toml").is_file(),
            "could not export revision {rev} of {} with git archive: a shallow clone lacks it \
             (git fetch --unshallow)",
            repo.display()
        );
    }
    let seeded = root.join(&profile);
    if !seeded.exists() {
        let status =
            Command::new("cp").arg("-al").arg(&profile_dir).arg(&seeded).status().context("run cp -al")?;
        ensure!(status.success(), "cp -al {} {} failed", profile_dir.display(), seeded.display());
        // Only the crates.io dependencies may be shared. The workspace's own crates (and the
        // vendored one) hash the same in both trees (cargo hashes path packages by their path
        // in the workspace) and the exported sources are older than this build's outputs, so
        // cargo would take this build's for the earlier revision's; and a hard-linked output
        // rewritten in place would change this build's too. So they go, and compile afresh.
        for sub in ["deps", ".fingerprint", "build", "incremental", ""] {
            let Ok(entries) = std::fs::read_dir(seeded.join(sub)) else { continue };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().replace('-', "_");
                let name = name.strip_prefix("lib").unwrap_or(&name);
                if name.starts_with("eddy") || name.starts_with("kafka_protocol") {
                    let path = e.path();
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.with_context(|| format!("remove {}", path.display()))?;
                }
            }
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--bin", "eddy-node", "--manifest-path"])
        .arg(src.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&root);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd.status().context("run cargo build for the earlier revision")?;
    ensure!(status.success() && built.is_file(), "cargo build of eddy-node at revision {rev} failed");
    Ok(built)
}

/// An outside program a test needs, by its path: found on `PATH`, or installed from Debian's
/// `package` when running as root (as CI does). A test never skips for want of one: this fails,
/// saying what to install.
pub fn program(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let find = || {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    apt_install(package)?;
    find().with_context(|| format!("{package} was installed but {name} is not on PATH"))
}

/// Installs a Debian package (as root; otherwise fails saying what to install).
pub fn apt_install(package: &str) -> anyhow::Result<()> {
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
    ensure!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0",
        "this test needs Debian's {package} and is not running as root to install it: run `apt-get install {package}`"
    );
    let apt = |args: &[&str]| -> anyhow::Result<bool> {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .context("run apt-get")?;
        if !out.status.success() {
            eprintln!("apt-get {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.status.success())
    };
    let install = ["install", "-y", "--no-install-recommends", package];
    if !apt(&install)? {
        // The package lists may be missing or stale on a fresh machine.
        ensure!(apt(&["update"])?, "apt-get update failed; cannot install {package}");
        ensure!(apt(&install)?, "apt-get install {package} failed");
    }
    Ok(())
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

/// A free port on 127.0.0.1 below Linux's ephemeral range (32768 and up), so that no outgoing
/// connection can take it between the moment it is chosen and a (re)start of the node that
/// binds it. Each test process starts at its own place in the range.
fn free_port() -> u16 {
    free_base_port(&[0])
}

/// A port `base` such that `base + o` is free on 127.0.0.1 for every offset `o` (at most 999),
/// all below Linux's ephemeral range, as [`free_port`] explains: an outgoing connection that
/// takes a node's port while the node is down makes its restart fail with "address in use".
pub fn free_base_port(offsets: &[u16]) -> u16 {
    const LOW: usize = 10_000;
    const SPAN: usize = 21_000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    assert!(offsets.iter().all(|o| *o < 1_000), "offsets must stay below 1,000");
    let start = (std::process::id() as usize).wrapping_mul(7_919) % SPAN;
    // Later calls in this process start past the whole block, so no other test takes a port
    // inside it (dev's ports are base + 0..=202).
    let block = offsets.iter().max().map_or(1, |m| usize::from(*m) + 1);
    for _ in 0..SPAN {
        let base = (LOW + (start + NEXT.fetch_add(block, Ordering::Relaxed)) % SPAN) as u16;
        // Free for TCP and UDP: a node's Raft port number also carries its liveness probes.
        let held: Result<Vec<_>, _> = offsets
            .iter()
            .map(|o| {
                let addr = ("127.0.0.1", base + o);
                TcpListener::bind(addr).and_then(|t| std::net::UdpSocket::bind(addr).map(|u| (t, u)))
            })
            .collect();
        if held.is_ok() {
            return base;
        }
    }
    panic!("no free ports on 127.0.0.1 in {LOW}..{}", LOW + SPAN + 1_000);
}

/// Node `id`'s rack in test clusters (as in `eddy-node dev`): `a`, `b`, `c`, then around again.
pub fn rack(id: u64) -> &'static str {
    ["a", "b", "c"][((id - 1) % 3) as usize]
}

pub struct NodeProc {
    pub id: u64,
    pub client_addr: String,
    pub raft_addr: String,
    pub http_addr: String,
    /// The Kafka listener; every test node has one, in rack `a`, `b` or `c` by its id.
    pub kafka_addr: String,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// The `eddy-node` it runs: this build's when `None` (see [`Cluster::set_binary`]).
    pub binary: Option<PathBuf>,
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

/// Acknowledged events: partition -> offset -> value.
pub type Acked = BTreeMap<u32, BTreeMap<u64, String>>;

/// Clusters of one test binary run one at a time: tests in a binary run on parallel threads, and
/// several multi-node clusters on a 2-core machine would make each other's timings meaningless.
/// Builds that take the whole machine (an earlier revision's node, librdkafka's test runner)
/// hold it too ([`alone`]): beside one, a cluster's group commit stopped coalescing and
/// `replicated_log`'s pipelined test failed.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `f` while no cluster runs and no other such work does: for preparation that takes the
/// whole machine.
pub fn alone<T>(f: impl FnOnce() -> T) -> T {
    let _alone = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
    /// Set for a cluster started with [`Cluster::start_secure`].
    pub secure: Option<Secure>,
    /// Node racks are this followed by the node id when set, else [`rack`].
    rack_prefix: Option<&'static str>,
    /// Released after `Drop` has stopped every node (fields drop after `drop` runs).
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// Writes configs for `n` nodes that form a new cluster together and starts them all.
    pub fn start(n: u64) -> anyhow::Result<Self> {
        Self::start_with(n, "")
    }

    /// [`Cluster::start`] with `extra` (top-level TOML keys) added to every node's config.
    pub fn start_with(n: u64, extra: &str) -> anyhow::Result<Self> {
        Self::start_racked(n, extra, None)
    }

    /// [`Cluster::start_with`], with node `i` in rack `{rack_prefix}{i}` when a prefix is given.
    pub fn start_racked(n: u64, extra: &str, rack_prefix: Option<&'static str>) -> anyhow::Result<Self> {
        Self::start_inner(n, extra, rack_prefix, None)
    }

    /// [`Cluster::start`] with every node running `binary` (another build's `eddy-node`, as
    /// for an upgrade) until [`Cluster::set_binary`] says otherwise.
    pub fn start_on(n: u64, binary: &Path) -> anyhow::Result<Self> {
        Self::start_inner(n, "", None, Some(binary))
    }

    fn start_inner(
        n: u64,
        extra: &str,
        rack_prefix: Option<&'static str>,
        binary: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let serial = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::Builder::new().prefix("eddy-cluster-").tempdir()?;
        let mut c = Self { dir, nodes: BTreeMap::new(), secure: None, rack_prefix, _serial: serial };
        for id in 1..=n {
            c.add_node_proc(id);
            c.set_binary(id, binary.map(Path::to_path_buf))?;
        }
        Self::form(&mut c, n, extra)?;
        Ok(c)
    }

    /// The `eddy-node` binary node `id` runs from its next start (`None`: this build's).
    pub fn set_binary(&mut self, id: u64, binary: Option<PathBuf>) -> anyhow::Result<()> {
        self.nodes.get_mut(&id).context("no such node")?.binary = binary;
        Ok(())
    }

    /// A cluster with TLS everywhere (mutual between nodes, certificates made with
    /// `eddyctl cert`), authentication on the client and Kafka listeners as `kafka_auth` says,
    /// and `User:admin` a superuser; [`Cluster::ctl`] runs as admin, by its client certificate.
    pub fn start_secure(n: u64, kafka_auth: bool) -> anyhow::Result<Self> {
        Self::start_secure_with(n, kafka_auth, "")
    }

    /// [`Cluster::start_secure`] with `extra` (TOML tables) in every node's config.
    pub fn start_secure_with(n: u64, kafka_auth: bool, extra: &str) -> anyhow::Result<Self> {
        Self::start_secure_inner(n, kafka_auth, extra, false)
    }

    /// [`Cluster::start_secure`] with `/metrics` and `/health` over HTTPS too (`[tls] http`).
    pub fn start_secure_https(n: u64, kafka_auth: bool) -> anyhow::Result<Self> {
        Self::start_secure_inner(n, kafka_auth, "", true)
    }

    fn start_secure_inner(n: u64, kafka_auth: bool, extra: &str, https: bool) -> anyhow::Result<Self> {
        let serial = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::Builder::new().prefix("eddy-cluster-").tempdir()?;
        let certs = dir.path().join("certs");
        let cert = |args: &[&str]| -> anyhow::Result<()> {
            let mut full = vec!["cert"];
            full.extend_from_slice(args);
            full.extend_from_slice(&["--dir", certs.to_str().context("path")?]);
            let out = run_eddyctl(&full, &[], None, CTL_TIMEOUT)?;
            ensure!(out.ok(), "eddyctl {full:?} failed: {out:?}");
            Ok(())
        };
        cert(&["create-ca"])?;
        cert(&["create-client", "admin"])?;
        for id in 1..=n + 2 {
            cert(&["create-node", &id.to_string()])?;
        }
        let secure = Secure { certs: certs.clone(), kafka_auth, https };
        let mut c =
            Self { dir, nodes: BTreeMap::new(), secure: Some(secure), rack_prefix: None, _serial: serial };
        Self::form(&mut c, n, extra)?;
        Ok(c)
    }

    fn form(c: &mut Self, n: u64, extra: &str) -> anyhow::Result<()> {
        for id in 1..=n {
            if !c.nodes.contains_key(&id) {
                c.add_node_proc(id);
            }
        }
        let mut members = extra.to_owned();
        for node in c.nodes.values() {
            members.push_str(&format!(
                "[[initial_members]]\nid = {}\nclient_addr = \"{}\"\nraft_addr = \"{}\"\n",
                node.id, node.client_addr, node.raft_addr
            ));
        }
        for id in 1..=n {
            c.write_config(id, &members)?;
            c.start_node(id)?;
        }
        Ok(())
    }

    /// Starts node `id` with `join` set to the client addresses of the running nodes, as an
    /// operator adds a node to a running cluster.
    pub fn join_node(&mut self, id: u64) -> anyhow::Result<()> {
        anyhow::ensure!(!self.nodes.contains_key(&id), "node {id} already exists");
        let join: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.is_running())
            .map(|n| format!("\"{}\"", n.client_addr))
            .collect();
        self.add_node_proc(id);
        self.write_config(id, &format!("join = [{}]\n", join.join(", ")))?;
        self.start_node(id)
    }

    fn add_node_proc(&mut self, id: u64) {
        let addr = || format!("127.0.0.1:{}", free_port());
        let node = NodeProc {
            id,
            client_addr: addr(),
            raft_addr: addr(),
            http_addr: addr(),
            kafka_addr: addr(),
            config_path: self.dir.path().join(format!("node-{id}.toml")),
            log_path: self.dir.path().join(format!("node-{id}.log")),
            binary: None,
            child: None,
        };
        self.nodes.insert(id, node);
    }

    fn write_config(&self, id: u64, extra: &str) -> anyhow::Result<()> {
        let node = &self.nodes[&id];
        let data_dir = self.dir.path().join(format!("data-{id}"));
        let (top, tables) = match &self.secure {
            None => (String::new(), String::new()),
            Some(s) => {
                let c = s.certs.display();
                (
                    "superusers = [\"User:admin\"]\n".to_owned(),
                    format!(
                        "[tls]\ncert = \"{c}/node-{id}.pem\"\nkey = \"{c}/node-{id}.key\"\nca = \"{c}/ca.pem\"\nhttp = {}\n[authentication]\nclient = true\nkafka = {}\n",
                        s.https, s.kafka_auth
                    ),
                )
            }
        };
        let config = format!(
            "{top}node_id = {id}\ndata_dir = \"{}\"\nclient_addr = \"{}\"\nraft_addr = \"{}\"\nhttp_addr = \"{}\"\nkafka_addr = \"{}\"\nrack = \"{}\"\n{extra}{tables}",
            data_dir.display(),
            node.client_addr,
            node.raft_addr,
            node.http_addr,
            node.kafka_addr,
            self.rack_prefix.map_or_else(|| rack(id).to_owned(), |p| format!("{p}{id}")),
        );
        std::fs::write(&node.config_path, config)?;
        Ok(())
    }

    pub fn brokers(&self) -> String {
        self.nodes.values().map(|n| n.client_addr.as_str()).collect::<Vec<_>>().join(",")
    }

    /// Waits until every running node has registered its Kafka listener (Kafka clients see a
    /// node as a broker from then on).
    pub fn wait_for_kafka(&self) -> anyhow::Result<()> {
        let want = self.running().len();
        wait_for("every node's Kafka listener registered", Duration::from_secs(30), || {
            let out = self.ctl(&["cluster", "status", "--output", "json"], None, CTL_TIMEOUT).ok()?;
            let v = out.json().ok()?;
            let n = v["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["kafka_addr"].is_string() && n["rack"].is_string())
                .count();
            (n == want).then_some(())
        })
    }

    /// Kafka clients' `bootstrap.servers`.
    pub fn kafka_bootstrap(&self) -> String {
        self.nodes.values().map(|n| n.kafka_addr.as_str()).collect::<Vec<_>>().join(",")
    }

    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[&id]
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("data-{id}"))
    }

    /// Bytes in the segment files of node `id`'s partition groups (every group but the
    /// metadata group, 0).
    pub fn partition_log_bytes(&self, id: u64) -> anyhow::Result<u64> {
        let mut total = 0;
        let groups = self.data_dir(id).join("groups");
        for g in std::fs::read_dir(&groups).with_context(|| format!("list {}", groups.display()))? {
            let g = g?;
            if g.file_name() == "0" {
                continue;
            }
            for f in std::fs::read_dir(g.path())? {
                let f = f?;
                if f.file_name().to_string_lossy().ends_with(".seg") {
                    total += f.metadata()?.len();
                }
            }
        }
        Ok(total)
    }

    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        anyhow::ensure!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log_path)?;
        let program = node.binary.clone().unwrap_or_else(|| binary("eddy-node"));
        let child = Command::new(program)
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

    /// Runs `eddyctl --brokers <all> --output json ARGS` with `stdin`, killing it after `timeout`;
    /// in a secure cluster, as the superuser admin.
    pub fn ctl(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> anyhow::Result<CtlOutput> {
        match &self.secure {
            None => run_ctl(&self.brokers(), args, stdin, timeout),
            Some(s) => ctl_as(&s.admin(), &self.brokers(), args, stdin, timeout),
        }
    }
}

/// Runs `eddyctl --brokers BROKERS --output json ARGS` with the credentials `who` gives (see
/// [`Secure`]).
pub fn ctl_as(
    who: &[(&str, String)],
    brokers: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<CtlOutput> {
    let mut full: Vec<&str> = vec!["--brokers", brokers, "--output", "json"];
    for (flag, value) in who {
        full.push(flag);
        full.push(value);
    }
    full.extend_from_slice(args);
    run_eddyctl(&full, &[], stdin, timeout)
}

/// The certificates of a secure cluster (see [`Cluster::start_secure`]).
#[derive(Clone, Debug)]
pub struct Secure {
    /// `ca.pem`/`.key`, `admin.pem`/`.key`, and `node-ID.pem`/`.key` for a few more ids than
    /// the cluster started with (for nodes that join later).
    pub certs: PathBuf,
    pub kafka_auth: bool,
    /// `/metrics` and `/health` over HTTPS (`[tls] http = true`).
    pub https: bool,
}

impl Secure {
    pub fn path(&self, name: &str) -> String {
        self.certs.join(name).display().to_string()
    }

    /// eddyctl options: TLS with the cluster CA, nothing else.
    pub fn anonymous(&self) -> Vec<(&'static str, String)> {
        vec![("--ca", self.path("ca.pem"))]
    }

    /// eddyctl options: the superuser's client certificate.
    pub fn admin(&self) -> Vec<(&'static str, String)> {
        self.cert_of("admin")
    }

    /// eddyctl options: the client or node certificate `stem`.pem.
    pub fn cert_of(&self, stem: &str) -> Vec<(&'static str, String)> {
        vec![
            ("--ca", self.path("ca.pem")),
            ("--cert", self.path(&format!("{stem}.pem"))),
            ("--key", self.path(&format!("{stem}.key"))),
        ]
    }

    /// eddyctl options: a token.
    pub fn token(&self, token: &str) -> Vec<(&'static str, String)> {
        vec![("--ca", self.path("ca.pem")), ("--token", token.to_owned())]
    }
}

/// How long one `eddyctl` run of the data helpers below may take.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

impl Cluster {
    /// Node ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.nodes.values().filter(|n| n.is_running()).map(|n| n.id).collect()
    }

    /// `topic describe` as JSON.
    pub fn describe(&self, topic: &str) -> anyhow::Result<Value> {
        let out = self.ctl(&["topic", "describe", topic], None, CTL_TIMEOUT)?;
        ensure!(out.ok(), "describe failed: {out:?}");
        out.json()
    }

    /// `node list` as JSON, by node id.
    pub fn node_list(&self) -> anyhow::Result<BTreeMap<u64, Value>> {
        let out = self.ctl(&["node", "list"], None, CTL_TIMEOUT)?;
        ensure!(out.ok(), "node list failed: {out:?}");
        let nodes = out.json()?["nodes"].as_array().cloned().context("nodes")?;
        nodes.into_iter().map(|n| Ok((n["id"].as_u64().context("id")?, n))).collect()
    }

    /// Waits until every partition of `topic` has a leader and `replicas` replicas.
    pub fn wait_for_leaders(&self, topic: &str, replicas: usize) -> anyhow::Result<Value> {
        wait_for("a leader for every partition", Duration::from_secs(30), || {
            let t = self.describe(topic).ok()?;
            let parts = t["partitions"].as_array()?;
            let ready = !parts.is_empty()
                && parts.iter().all(|p| {
                    p["leader"].is_u64() && p["replicas"].as_array().is_some_and(|r| r.len() == replicas)
                });
            ready.then_some(t)
        })
    }

    /// Produces `values` to partition `p` and records the acknowledged offsets.
    pub fn produce(&self, topic: &str, p: u32, values: &[String], acked: &mut Acked) -> anyhow::Result<()> {
        let input = values.iter().map(|v| format!("{v}\n")).collect::<String>();
        let out = self.ctl(
            &["produce", topic, "--partition", &p.to_string()],
            Some(input.as_bytes()),
            CTL_TIMEOUT,
        )?;
        ensure!(out.ok(), "produce to partition {p} failed: {}", out.stderr);
        let lines = out.json_lines()?;
        ensure!(lines.len() == values.len(), "expected {} acks, got {}", values.len(), lines.len());
        for (v, line) in values.iter().zip(lines) {
            ensure!(line["partition"] == p, "ack for the wrong partition: {line}");
            record_ack(acked, p, line["offset"].as_u64().context("offset")?, v)?;
        }
        Ok(())
    }

    /// The partition's high watermark as its current leader reports it, once the leader has
    /// applied at least every acknowledged event.
    pub fn high_watermark(&self, topic: &str, p: u32, acked: &Acked) -> anyhow::Result<u64> {
        let info = self.describe(topic)?;
        let part = partition_info(&info, p)?;
        ensure!(part["leader"].is_u64(), "partition {p} has no leader yet");
        let hw = part["high_watermark"].as_u64().context("high_watermark")?;
        let needed = acked.get(&p).and_then(|a| a.keys().next_back()).map_or(0, |o| o + 1);
        ensure!(
            hw >= needed,
            "partition {p}: the leader's high watermark {hw} is below the acknowledged {needed}"
        );
        Ok(hw)
    }

    /// Reads partition `p` from node `replica` up to `count` records and checks that offsets
    /// are dense and every acknowledged event is there, once, at its offset.
    pub fn check_replica(
        &self,
        topic: &str,
        p: u32,
        replica: u64,
        count: u64,
        acked: &Acked,
    ) -> anyhow::Result<()> {
        let args = [
            "consume",
            topic,
            "--partition",
            &p.to_string(),
            "--replica",
            &replica.to_string(),
            "--count",
            &count.to_string(),
        ];
        let out = self.ctl(&args, None, CTL_TIMEOUT)?;
        ensure!(out.ok(), "consume of partition {p} from node {replica} failed: {}", out.stderr);
        let records = out.json_lines()?;
        ensure!(
            records.len() as u64 == count,
            "node {replica} returned {} of {count} records of partition {p}",
            records.len()
        );
        let mut seen: BTreeMap<u64, String> = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            let offset = r["offset"].as_u64().context("offset")?;
            ensure!(
                offset == i as u64,
                "partition {p} on node {replica}: offset {offset} at position {i} (offsets must be dense)"
            );
            seen.insert(offset, r["value"].as_str().context("value")?.to_owned());
        }
        let empty = BTreeMap::new();
        let acked = acked.get(&p).unwrap_or(&empty);
        let acked_values: std::collections::BTreeSet<&String> = acked.values().collect();
        let mut values_seen: BTreeMap<&str, u64> = BTreeMap::new();
        for (o, v) in &seen {
            if let Some(prev) = values_seen.insert(v.as_str(), *o)
                && acked_values.contains(v)
            {
                bail!(
                    "acknowledged event {v:?} appears twice in partition {p} on node {replica}: offsets {prev} and {o}"
                );
            }
        }
        for (o, v) in acked {
            ensure!(
                seen.get(o) == Some(v),
                "partition {p} on node {replica}: acknowledged {v:?} at offset {o}, found {:?}",
                seen.get(o)
            );
        }
        Ok(())
    }

    /// Checks every acknowledged event of `topic` on every current replica of its partition
    /// (waiting for each to catch up), and returns how many replicas were read per partition.
    pub fn check_all_replicas(&self, topic: &str, acked: &Acked) -> anyhow::Result<BTreeMap<u32, Vec<u64>>> {
        let mut checked = BTreeMap::new();
        let info = self.describe(topic)?;
        for part in info["partitions"].as_array().context("partitions")? {
            let p = u32::try_from(part["partition"].as_u64().context("partition")?)?;
            let replicas: Vec<u64> =
                part["replicas"].as_array().context("replicas")?.iter().filter_map(Value::as_u64).collect();
            let hw =
                retry("the partition's leader to have applied its log", Duration::from_secs(30), || {
                    self.high_watermark(topic, p, acked)
                })?;
            for &r in &replicas {
                retry("the replica to serve every acknowledged event", Duration::from_secs(30), || {
                    self.check_replica(topic, p, r, hw, acked)
                })?;
            }
            checked.insert(p, replicas);
        }
        Ok(checked)
    }

    /// `GET path` from node `id`'s HTTP address: the status code and the body.
    pub fn http_get(&self, id: u64, path: &str) -> anyhow::Result<(u16, String)> {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&self.nodes[&id].http_addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").context("HTTP response without a header end")?;
        let status = head.split_whitespace().nth(1).context("status line")?.parse()?;
        Ok((status, body.to_owned()))
    }

    /// Starts a producer that writes one event to `topic`/`p` every `interval` until stopped.
    pub fn background_producer(
        &self,
        topic: &str,
        p: u32,
        prefix: &str,
        interval: Duration,
    ) -> anyhow::Result<BackgroundProducer> {
        BackgroundProducer::start(&self.brokers(), topic, p, prefix, interval, &[])
    }

    /// [`Self::background_producer`] with more `eddyctl produce` arguments.
    pub fn background_producer_with(
        &self,
        topic: &str,
        p: u32,
        prefix: &str,
        interval: Duration,
        args: &[&str],
    ) -> anyhow::Result<BackgroundProducer> {
        BackgroundProducer::start(&self.brokers(), topic, p, prefix, interval, args)
    }
}

/// The `p`th entry of a described topic's partitions.
pub fn partition_info(topic: &Value, p: u32) -> anyhow::Result<&Value> {
    topic["partitions"].as_array().and_then(|a| a.get(p as usize)).context("partition missing")
}

fn record_ack(acked: &mut Acked, p: u32, offset: u64, value: &str) -> anyhow::Result<()> {
    let prev = acked.entry(p).or_default().insert(offset, value.to_owned());
    ensure!(prev.is_none(), "offset {offset} of partition {p} acknowledged twice ({prev:?} and {value})");
    Ok(())
}

/// `n` distinct values starting with `prefix`.
pub fn values(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// A steady stream of events into one partition through one `eddyctl produce` process, as an
/// application keeps producing while operators work on the cluster. Every acknowledgement is
/// timestamped when it arrives, so gaps show how long the partition was unwritable.
pub struct BackgroundProducer {
    partition: u32,
    child: Child,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    writer: Option<JoinHandle<Vec<String>>>,
    reader: Option<JoinHandle<Vec<(Instant, String)>>>,
    errors: Option<JoinHandle<String>>,
}

/// What a [`BackgroundProducer`] saw.
#[derive(Debug)]
pub struct ProduceReport {
    pub partition: u32,
    /// Values written, in order.
    pub sent: Vec<String>,
    /// (arrival, offset) of each acknowledgement, in the order of `sent`.
    pub acks: Vec<(Instant, u64)>,
    pub stderr: String,
    pub code: Option<i32>,
}

impl BackgroundProducer {
    fn start(
        brokers: &str,
        topic: &str,
        p: u32,
        prefix: &str,
        interval: Duration,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(binary("eddyctl"))
            .args(["--brokers", brokers, "--output", "json", "--request-timeout", "10s", "produce", topic])
            .args(["--partition", &p.to_string()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start eddyctl produce")?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (flag, prefix) = (stop.clone(), prefix.to_owned());
        let writer = std::thread::spawn(move || {
            let mut sent = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let v = format!("{prefix}-{:06}", sent.len());
                if writeln!(stdin, "{v}").and_then(|()| stdin.flush()).is_err() {
                    break;
                }
                sent.push(v);
                std::thread::sleep(interval);
            }
            sent // Dropping stdin ends the input: eddyctl finishes what it has and exits.
        });
        let acked = Arc::new(AtomicUsize::new(0));
        let count = acked.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let lines = std::io::BufReader::new(stdout).lines().map_while(Result::ok);
            lines
                .inspect(|_| _ = count.fetch_add(1, Ordering::Relaxed))
                .map(|l| (Instant::now(), l))
                .collect()
        });
        let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
        Ok(Self {
            partition: p,
            child,
            stop,
            acked,
            writer: Some(writer),
            reader: Some(reader),
            errors: Some(errors),
        })
    }

    /// Acknowledgements so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Ends the input, waits up to `timeout` for every outstanding acknowledgement, and
    /// reports.
    pub fn stop(mut self, timeout: Duration) -> anyhow::Result<ProduceReport> {
        self.stop.store(true, Ordering::Relaxed);
        let sent =
            self.writer.take().context("writer")?.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
        let code = wait_child(&mut self.child, timeout)
            .context("eddyctl produce did not finish after its input ended")?;
        let lines =
            self.reader.take().context("reader")?.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let stderr = self.errors.take().context("errors")?.join().unwrap_or_default();
        let mut acks = Vec::with_capacity(lines.len());
        for (at, line) in lines {
            let v: Value = serde_json::from_str(&line).with_context(|| format!("parse ack {line:?}"))?;
            ensure!(v["partition"] == self.partition, "ack for the wrong partition: {line}");
            acks.push((at, v["offset"].as_u64().context("offset")?));
        }
        Ok(ProduceReport { partition: self.partition, sent, acks, stderr, code })
    }
}

impl Drop for BackgroundProducer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProduceReport {
    /// Fails unless the producer exited cleanly with every event acknowledged.
    pub fn ensure_clean(&self) -> anyhow::Result<()> {
        ensure!(
            self.code == Some(0) && self.acks.len() == self.sent.len(),
            "the producer of partition {} saw errors: exit {:?}, {} of {} events acknowledged; stderr: {}",
            self.partition,
            self.code,
            self.acks.len(),
            self.sent.len(),
            self.stderr
        );
        Ok(())
    }

    /// Adds the acknowledged events to `acked`.
    pub fn record(&self, acked: &mut Acked) -> anyhow::Result<()> {
        for (v, (_, offset)) in self.sent.iter().zip(&self.acks) {
            record_ack(acked, self.partition, *offset, v)?;
        }
        Ok(())
    }

    /// The longest time without an acknowledgement between `from` and `to`.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut last = from;
        let mut longest = Duration::ZERO;
        for &(at, _) in self.acks.iter().filter(|(at, _)| *at > from && *at <= to) {
            longest = longest.max(at - last);
            last = at;
        }
        longest.max(to.saturating_duration_since(last))
    }
}

/// Waits up to `timeout` for `child` to exit and returns its exit code; kills it (by its handle)
/// and fails after that.
fn wait_child(child: &mut Child, timeout: Duration) -> anyhow::Result<Option<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s.code());
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            bail!("still running after {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `eddyctl` against `brokers`, killing it (by its PID) if it runs past `timeout`.
pub fn run_ctl(
    brokers: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<CtlOutput> {
    let mut full = vec!["--brokers", brokers, "--output", "json"];
    full.extend_from_slice(args);
    run_eddyctl(&full, &[], stdin, timeout)
}

/// Runs `eddyctl ARGS` with extra environment variables, killing it (by its PID) if it runs
/// past `timeout`.
pub fn run_eddyctl(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<CtlOutput> {
    let mut child = Command::new(binary("eddyctl"))
        .args(args)
        .envs(env.iter().copied())
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

/// One `eddyctl consume TOPIC --group G` process: a member of a consumer group, as an
/// application runs it. Every record it prints is collected; it can be SIGKILLed (a crash) or
/// interrupted (a clean leave).
pub struct GroupMember {
    child: Child,
    reader: Option<JoinHandle<Vec<Value>>>,
    errors: Option<JoinHandle<String>>,
    printed: Arc<AtomicUsize>,
}

/// What a [`GroupMember`] printed, and how it ended.
#[derive(Debug)]
pub struct MemberReport {
    pub records: Vec<Value>,
    pub stderr: String,
    pub code: Option<i32>,
}

impl GroupMember {
    /// Starts a member; `extra` are further `consume` flags.
    pub fn start(brokers: &str, topic: &str, group: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary("eddyctl"))
            .args(["--brokers", brokers, "--output", "json", "consume", topic, "--group", group])
            .args(extra)
            .env("EDDYCTL_LOG", "eddy_ops=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start eddyctl consume --group")?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let printed = Arc::new(AtomicUsize::new(0));
        let count = printed.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
                .inspect(|_| _ = count.fetch_add(1, Ordering::Relaxed))
                .collect()
        });
        let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
        Ok(Self { child, reader: Some(reader), errors: Some(errors), printed })
    }

    /// Records printed so far.
    pub fn printed(&self) -> usize {
        self.printed.load(Ordering::Relaxed)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal`, waits up to `timeout` for the process to end (then kills it), and
    /// returns what it printed.
    pub fn stop(self, signal: nix::sys::signal::Signal, timeout: Duration) -> anyhow::Result<MemberReport> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, signal)?;
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the process to end (killing it after that), and returns what it
    /// printed.
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<MemberReport> {
        let code = wait_child(&mut self.child, timeout).context("eddyctl consume did not exit")?;
        let records =
            self.reader.take().context("reader")?.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let stderr = self.errors.take().context("errors")?.join().unwrap_or_default();
        Ok(MemberReport { records, stderr, code })
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client versions the test installs (pinned, so a new release cannot change the test).
pub const KAFKA_PYTHON_PACKAGES: &[&str] = &["confluent-kafka==2.16.1", "kafka-python==3.0.12"];

/// `target/kafka-venv`'s python, with [`KAFKA_PYTHON_PACKAGES`] installed.
pub fn kafka_python() -> anyhow::Result<PathBuf> {
    let target =
        crate::binary("eddy-node").parent().and_then(Path::parent).context("target directory")?.to_path_buf();
    let venv = target.join("kafka-venv");
    let python = venv.join("bin/python");
    let marker = venv.join("installed.txt");
    let wanted = KAFKA_PYTHON_PACKAGES.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
        return Ok(python);
    }
    let system = crate::program("python3", "python3")?;
    let made = Command::new(&system).args(["-m", "venv", "--clear"]).arg(&venv).output()?;
    if !made.status.success() {
        // Debian's python3 needs python3-venv for this.
        crate::apt_install("python3-venv")?;
        let again = Command::new(&system).args(["-m", "venv", "--clear"]).arg(&venv).output()?;
        ensure!(again.status.success(), "python3 -m venv failed: {}", String::from_utf8_lossy(&again.stderr));
    }
    let pip = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(KAFKA_PYTHON_PACKAGES)
        .output()?;
    ensure!(
        pip.status.success(),
        "pip install {KAFKA_PYTHON_PACKAGES:?} failed: {}",
        String::from_utf8_lossy(&pip.stderr)
    );
    std::fs::write(&marker, wanted)?;
    Ok(python)
}
