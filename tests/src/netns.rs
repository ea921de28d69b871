//! Separate network hosts on one machine: a hub network namespace holding a bridge, and one
//! namespace per host with `eth0` on the bridge at `<subnet>.<n>/24`. Used by `tests/netns.rs`
//! and by `eddy-sim jepsen`, which also cuts, throttles and drops traffic between the hosts.
//!
//! Everything is this process's own: the namespaces are named after its PID and removed, with
//! their links, when the [`Net`] is dropped. Needs root and iproute2 (installed from Debian by
//! [`crate::program`] when missing); fails saying so where namespaces cannot be made.

use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;

use anyhow::Context;
use anyhow::ensure;

/// Runs `program ARGS`, failing with its stderr.
pub fn run(program: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {} {args:?}", program.display()))?;
    ensure!(
        out.status.success(),
        "{} {}: {}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Writes zeros to `path` until `leave` bytes are available on its filesystem (a disk that
/// fills up, for `tests/disk_full.rs` and `eddy-sim jepsen`); returns the bytes written.
pub fn fill_disk(path: &Path, leave: u64) -> anyhow::Result<u64> {
    let dir = path.parent().context("the filler's directory")?;
    let st = nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let mut left = (st.blocks_available() * st.fragment_size()).saturating_sub(leave);
    let mut f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0;
    while left > 0 {
        let n = f.write(&chunk[..left.min(1 << 20) as usize]).context("fill the disk")?;
        (written, left) = (written + n as u64, left - n as u64);
    }
    Ok(written)
}

/// The network: host `n` (from 1) is namespace `hosts[n - 1]` at `<subnet>.<n>`.
pub struct Net {
    pub ip: PathBuf,
    pub hub: String,
    pub hosts: Vec<String>,
    pub subnet: String,
}

impl Net {
    /// `hosts` namespaces on one bridge, in `subnet` (three octets, e.g. "10.88.0").
    pub fn new(hosts: u64, subnet: &str) -> anyhow::Result<Self> {
        let ip_path = crate::program("ip", "iproute2")?;
        let tag = std::process::id();
        let mut net =
            Self { ip: ip_path, hub: format!("eddy{tag}hub"), hosts: Vec::new(), subnet: subnet.to_owned() };
        run(&net.ip, &["netns", "add", &net.hub]).context("making network namespaces needs root")?;
        let ipc = |args: &[&str]| run(&net.ip, args);
        ipc(&["-n", &net.hub, "link", "add", "br0", "type", "bridge"])?;
        ipc(&["-n", &net.hub, "link", "set", "br0", "up"])?;
        for n in 1..=hosts {
            let ns = format!("eddy{tag}h{n}");
            run(&net.ip, &["netns", "add", &ns])?;
            net.hosts.push(ns.clone());
            let ipc = |args: &[&str]| run(&net.ip, args);
            let port = format!("v{n}");
            ipc(&[
                "-n", &net.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ipc(&["-n", &net.hub, "link", "set", &port, "master", "br0"])?;
            ipc(&["-n", &net.hub, "link", "set", &port, "up"])?;
            ipc(&["-n", &ns, "addr", "add", &format!("{subnet}.{n}/24"), "dev", "eth0"])?;
            ipc(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ipc(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Host `n`'s address.
    pub fn addr(&self, n: u64) -> String {
        format!("{}.{n}", self.subnet)
    }

    /// A command run inside host `n`'s namespace (`ip netns exec` execs it, so the child's PID
    /// is the program's).
    pub fn command(&self, n: u64, program: &Path) -> Command {
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", &self.hosts[n as usize - 1]]).arg(program);
        c
    }

    /// Runs `program ARGS` inside host `n`, with `stdin` as its input, failing with its stderr.
    pub fn exec(&self, n: u64, program: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
        let mut cmd = self.command(n, program);
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().with_context(|| format!("run {} in host {n}", program.display()))?;
        if let Some(input) = stdin {
            child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "{} {} in host {n}: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// The path of host `n`'s namespace, for `setns(2)`.
    pub fn ns_path(&self, n: u64) -> PathBuf {
        Path::new("/run/netns").join(&self.hosts[n as usize - 1])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = run(&self.ip, &["netns", "del", ns]);
        }
    }
}
