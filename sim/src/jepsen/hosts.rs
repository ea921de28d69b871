//! The real-process cluster of one `eddy-sim jepsen` round: `eddy-node` processes, each in a
//! network namespace of its own (a host) with its data on a size-limited tmpfs of its own, and
//! the levers the nemesis pulls on them: signals, packet filters (nftables), a throttled link
//! (tc tbf) and a filled disk.
//!
//! Host `h` is namespace `h` of the [`Net`] at `<subnet>.h`; node ids start equal to their
//! host and a node that joins later gets the next id on a free host. Every process, mount and
//! filter made here is removed by [`Hosts::shutdown`], which `Drop` also calls, however the
//! round ends.

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use eddy_tests::netns::Net;
use eddy_tests::netns::run;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

pub const CLIENT_PORT: u16 = 9091;
pub const RAFT_PORT: u16 = 9191;
const HTTP_PORT: u16 = 9291;

/// One host's node process.
pub struct NodeProc {
    pub id: u64,
    child: Option<Child>,
    /// Stopped by SIGSTOP and not yet continued.
    pub paused: bool,
}

impl NodeProc {
    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// A host of the round: its node (if any) and its disk.
pub struct Host {
    pub n: u64,
    pub node: Option<NodeProc>,
    pub disk: PathBuf,
    /// The nftables rules currently applied inside the host, by the fault that added them.
    pub rules: BTreeMap<u64, Vec<String>>,
    pub throttled: bool,
}

pub struct Hosts {
    pub net: Net,
    nft: PathBuf,
    tc: PathBuf,
    node_binary: PathBuf,
    dir: PathBuf,
    disk_bytes: u64,
    /// Hosts that can run nodes: 1..=hosts.len(); the client host is the next one.
    pub hosts: Vec<Host>,
    /// Nodes that ever existed, by id: their host.
    pub placement: BTreeMap<u64, u64>,
    /// Nodes that exited without being asked to: (id, status).
    pub unexpected_exits: Vec<(u64, String)>,
    pub next_id: u64,
}

impl Hosts {
    /// Makes `node_hosts` hosts (the first `nodes` run the initial members), plus the client's.
    pub fn start(
        net: Net,
        nodes: u64,
        node_binary: &Path,
        dir: &Path,
        disk_bytes: u64,
    ) -> anyhow::Result<Self> {
        let node_hosts = net.hosts.len() as u64 - 1;
        let nft = eddy_tests::program("nft", "nftables")?;
        let tc = eddy_tests::program("tc", "iproute2")?;
        let mut hosts = Self {
            net,
            nft,
            tc,
            node_binary: node_binary.to_owned(),
            dir: dir.to_owned(),
            disk_bytes,
            hosts: Vec::new(),
            placement: BTreeMap::new(),
            unexpected_exits: Vec::new(),
            next_id: nodes + 1,
        };
        for n in 1..=node_hosts {
            let disk = dir.join(format!("disk-{n}"));
            std::fs::create_dir_all(&disk)?;
            run(
                Path::new("mount"),
                &["-t", "tmpfs", "-o", &format!("size={disk_bytes}"), "tmpfs", &disk.to_string_lossy()],
            )
            .context("mount a size-limited tmpfs for a node's data (needs root)")?;
            hosts.hosts.push(Host { n, node: None, disk, rules: BTreeMap::new(), throttled: false });
            hosts.net.exec(
                n,
                &hosts.nft,
                &["-f", "-"],
                Some(
                    "table inet eddy {\n chain input { type filter hook input priority 0; policy accept; }\n \
                     chain output { type filter hook output priority 0; policy accept; }\n}\n",
                ),
            )?;
        }
        let members: String = (1..=nodes)
            .map(|n| {
                format!(
                    "[[initial_members]]\nid = {n}\nclient_addr = \"{}:{CLIENT_PORT}\"\nraft_addr = \"{}:{RAFT_PORT}\"\n",
                    hosts.net.addr(n),
                    hosts.net.addr(n)
                )
            })
            .collect();
        for n in 1..=nodes {
            hosts.launch(n, n, &members)?;
        }
        Ok(hosts)
    }

    pub fn client_host(&self) -> u64 {
        self.net.hosts.len() as u64
    }

    pub fn brokers(&self) -> Vec<String> {
        self.placement.values().map(|h| format!("{}:{CLIENT_PORT}", self.net.addr(*h))).collect()
    }

    pub fn host_of(&self, id: u64) -> Option<u64> {
        self.placement.get(&id).copied()
    }

    fn host_mut(&mut self, n: u64) -> &mut Host {
        &mut self.hosts[n as usize - 1]
    }

    fn config_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.toml"))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.log"))
    }

    /// Writes node `id`'s config for host `n` (`membership`: its `initial_members` or `join`)
    /// and starts it.
    fn launch(&mut self, n: u64, id: u64, membership: &str) -> anyhow::Result<()> {
        let addr = self.net.addr(n);
        let data = self.host_mut(n).disk.join(format!("node-{id}"));
        std::fs::write(
            self.config_path(id),
            format!(
                "node_id = {id}\ndata_dir = \"{}\"\nclient_addr = \"0.0.0.0:{CLIENT_PORT}\"\n\
                 raft_addr = \"0.0.0.0:{RAFT_PORT}\"\nhttp_addr = \"0.0.0.0:{HTTP_PORT}\"\n\
                 advertised_client_addr = \"{addr}:{CLIENT_PORT}\"\nadvertised_raft_addr = \"{addr}:{RAFT_PORT}\"\n\
                 {membership}",
                data.display()
            ),
        )?;
        self.placement.insert(id, n);
        self.start_node(id)
    }

    /// Starts node `id` on its host (again, after a kill: its data is where it was).
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.host_of(id).context("no such node")?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(id))?;
        let child = self
            .net
            .command(n, &self.node_binary)
            .arg("--config")
            .arg(self.config_path(id))
            .env("RUST_LOG", "info,openraft=error,h2=warn,hyper=warn,sled=warn,tonic=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("start {}", self.node_binary.display()))?;
        self.host_mut(n).node = Some(NodeProc { id, child: Some(child), paused: false });
        Ok(())
    }

    /// A new node joins the cluster on free host `n`, with the next node id.
    pub fn join(&mut self, n: u64) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let brokers: Vec<String> = self.brokers().iter().map(|b| format!("\"{b}\"")).collect();
        self.launch(n, id, &format!("join = [{}]\n", brokers.join(", ")))?;
        Ok(id)
    }

    /// Nodes that have a host (running or not): the members, as far as the runner knows.
    pub fn members(&self) -> Vec<u64> {
        self.placement
            .iter()
            .filter(|(id, h)| self.hosts[**h as usize - 1].node.as_ref().is_some_and(|p| p.id == **id))
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn node(&mut self, id: u64) -> Option<&mut NodeProc> {
        let n = self.host_of(id)?;
        self.hosts.get_mut(n as usize - 1)?.node.as_mut().filter(|p| p.id == id)
    }

    pub fn signal(&mut self, id: u64, signal: Signal) -> anyhow::Result<()> {
        let pid = self.node(id).and_then(|p| p.pid()).context("the node is not running")?;
        nix::sys::signal::kill(pid, signal).with_context(|| format!("send {signal} to node {id}"))?;
        if let Some(p) = self.node(id) {
            match signal {
                Signal::SIGSTOP => p.paused = true,
                Signal::SIGCONT => p.paused = false,
                _ => {}
            }
        }
        Ok(())
    }

    /// Stops node `id`: SIGKILL at once, or SIGTERM with up to 10 s to exit (then SIGKILL).
    pub fn stop(&mut self, id: u64, graceful: bool) {
        let Some(p) = self.node(id) else { return };
        let Some(mut child) = p.child.take() else { return };
        let pid = Pid::from_raw(child.id() as i32);
        if p.paused {
            let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
            p.paused = false;
        }
        if graceful && nix::sys::signal::kill(pid, Signal::SIGTERM).is_ok() {
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Notes nodes that exited although nobody stopped them.
    pub fn reap(&mut self) {
        for h in &mut self.hosts {
            if let Some(p) = &mut h.node
                && let Some(c) = &mut p.child
                && let Ok(Some(status)) = c.try_wait()
            {
                self.unexpected_exits.push((p.id, status.to_string()));
                p.child = None;
            }
        }
    }

    /// Node `id` leaves for good: its process stops and its host is free again.
    pub fn retire(&mut self, id: u64) {
        self.stop(id, true);
        if let Some(n) = self.host_of(id) {
            self.host_mut(n).node = None;
            let data = self.host_mut(n).disk.join(format!("node-{id}"));
            let _ = std::fs::remove_dir_all(data);
        }
    }

    /// Rewrites host `n`'s filter rules from [`Host::rules`], atomically.
    fn apply_rules(&mut self, n: u64) -> anyhow::Result<()> {
        let mut script = String::from("flush chain inet eddy input\nflush chain inet eddy output\n");
        for rule in self.hosts[n as usize - 1].rules.values().flatten() {
            script.push_str(&format!("add rule inet eddy {rule}\n"));
        }
        self.net.exec(n, &self.nft, &["-f", "-"], Some(&script))
    }

    /// Adds the rules of fault `fault` inside host `n` (`input ...` or `output ...`).
    pub fn add_rules(&mut self, n: u64, fault: u64, rules: Vec<String>) -> anyhow::Result<()> {
        self.host_mut(n).rules.entry(fault).or_default().extend(rules);
        self.apply_rules(n)
    }

    pub fn remove_rules(&mut self, fault: u64) -> anyhow::Result<()> {
        for n in 1..=self.hosts.len() as u64 {
            if self.host_mut(n).rules.remove(&fault).is_some() {
                self.apply_rules(n)?;
            }
        }
        Ok(())
    }

    /// Throttles host `n`'s outgoing link (a token bucket: 256 kbit/s, up to 400 ms queued).
    pub fn throttle(&mut self, n: u64, on: bool) -> anyhow::Result<()> {
        let tc = self.tc.clone();
        if on {
            self.net.exec(
                n,
                &tc,
                &[
                    "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "256kbit", "burst", "16kb",
                    "latency", "400ms",
                ],
                None,
            )?;
        } else {
            self.net.exec(n, &tc, &["qdisc", "del", "dev", "eth0", "root"], None)?;
        }
        self.host_mut(n).throttled = on;
        Ok(())
    }

    fn filler(&self, n: u64) -> PathBuf {
        self.hosts[n as usize - 1].disk.join("filler")
    }

    /// Fills host `n`'s disk until `leave` bytes are available; returns the bytes written.
    pub fn fill_disk(&mut self, n: u64, leave: u64) -> anyhow::Result<u64> {
        eddy_tests::netns::fill_disk(&self.filler(n), leave)
    }

    pub fn free_disk(&mut self, n: u64) {
        let _ = std::fs::remove_file(self.filler(n));
    }

    /// Stops every node and removes the filters, throttles and mounts.
    pub fn shutdown(&mut self) {
        if self.hosts.is_empty() {
            return;
        }
        let ids: Vec<u64> = self.placement.keys().copied().collect();
        for id in ids {
            self.stop(id, false);
        }
        for n in 1..=self.hosts.len() as u64 {
            self.free_disk(n);
            let disk = self.hosts[n as usize - 1].disk.clone();
            let _ = run(Path::new("umount"), &[&disk.to_string_lossy()]);
        }
        self.hosts.clear();
    }

    /// The round's directory (configs and node logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Moves the calling thread into the network namespace at `ns` (threads it starts afterwards
/// are there too): the runner's clients live in a host of their own.
pub fn enter_path(ns: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .context("setns into the client's namespace")?;
    Ok(())
}
