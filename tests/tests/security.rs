//! A secure cluster end to end (issue 11): TLS everywhere with certificates made by
//! `eddyctl cert`, mutual TLS between nodes, users with tokens, ACLs, and what survives restarts,
//! a metadata failover and a node that joins later. Everything goes through `eddyctl`, as an
//! operator would.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::io::Read;
use std::io::Write;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::ensure;
use eddy_tests::CTL_TIMEOUT;
use eddy_tests::Cluster;
use eddy_tests::CtlOutput;
use eddy_tests::run_eddyctl;
use eddy_tests::wait_for;

const SHORT: Duration = Duration::from_secs(20);

/// `eddyctl acl add|remove` of alice's binding in these tests: write on every topic that starts
/// with `orders.`.
fn acl(verb: &str) -> [&str; 11] {
    [
        "acl",
        verb,
        "--principal",
        "User:alice",
        "--allow",
        "--operation",
        "write",
        "--topic",
        "orders.",
        "--pattern",
        "prefixed",
    ]
}

fn refused(out: &CtlOutput, needle: &str) -> anyhow::Result<()> {
    ensure!(!out.ok(), "expected a refusal mentioning {needle:?}, got success: {out:?}");
    ensure!(out.stderr.contains(needle), "expected {needle:?} in the error: {}", out.stderr);
    Ok(())
}

/// `GET /metrics` of a node, as text.
fn metrics(http_addr: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(http_addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The `eddy_auth_failures_total` lines of every node's metrics.
fn auth_failures(c: &Cluster) -> anyhow::Result<String> {
    let mut reasons = String::new();
    for n in c.nodes.values().filter(|n| n.is_running()) {
        let m = metrics(&n.http_addr)?;
        reasons.extend(
            m.lines().filter(|l| l.starts_with("eddy_auth_failures_total")).map(|l| format!("{l}\n")),
        );
    }
    Ok(reasons)
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let bytes = std::fs::read(e.path())?;
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(e.path().display().to_string());
                }
            }
        }
    }
    Ok(found)
}

#[test]
fn a_secure_cluster_authenticates_authorizes_and_keeps_its_users() -> anyhow::Result<()> {
    let mut c = Cluster::start_secure(3, false)?;
    let s = c.secure.clone().context("secure")?;
    let result = secure_cluster(&mut c, &s);
    if result.is_err() {
        for id in c.nodes.keys() {
            eprintln!("--- node {id}\n{}", c.log_tail(*id, 40));
        }
    }
    result
}

fn secure_cluster(c: &mut Cluster, s: &eddy_tests::Secure) -> anyhow::Result<()> {
    let all = c.brokers();
    let admin = s.admin();
    let ctl = |who: &[(&str, String)], brokers: &str, args: &[&str], stdin: Option<&[u8]>| {
        eddy_tests::ctl_as(who, brokers, args, stdin, CTL_TIMEOUT)
    };

    // The cluster elects and replicates over mutual TLS: a topic of 3 replicas takes writes
    // and every replica serves them.
    let health = ["cluster", "health", "--exit-when-healthy", "--timeout", "40s"];
    let out = ctl(&admin, &all, &health, None)?;
    ensure!(out.ok(), "the secure cluster is not healthy: {out:?}");
    let out = ctl(&admin, &all, &["user", "whoami"], None)?;
    ensure!(
        out.ok() && out.json()?["principal"] == "User:admin" && out.json()?["superuser"] == true,
        "{out:?}"
    );
    for t in ["orders.eu", "payments"] {
        let out = ctl(
            &admin,
            &all,
            &["topic", "create", t, "--partitions", "1", "--replication-factor", "3"],
            None,
        )?;
        ensure!(out.ok(), "topic create {t}: {out:?}");
        c.wait_for_leaders(t, 3)?;
    }
    let out = ctl(&admin, &all, &["produce", "orders.eu", "--partition", "0"], Some(b"one\ntwo\n"))?;
    ensure!(out.ok() && out.json_lines()?.len() == 2, "admin produce: {out:?}");
    for id in 1..=3u64 {
        let replica = id.to_string();
        let args = ["consume", "orders.eu", "--partition", "0", "--count", "2", "--replica", &replica];
        let out = wait_for("the replica to have both events", SHORT, || {
            ctl(&admin, &all, &args, None)
                .ok()
                .filter(|o| o.ok() && o.json_lines().is_ok_and(|l| l.len() == 2))
        })?;
        ensure!(out.stdout.contains("\"one\"") && out.stdout.contains("\"two\""), "replica {id}: {out:?}");
    }

    // Acceptance 1: plaintext to a TLS node, a wrong CA, and a plaintext address with TLS
    // options each fail with a message that says so.
    let plain =
        run_eddyctl(&["--brokers", &all, "--request-timeout", "3s", "topic", "list"], &[], None, SHORT)?;
    refused(&plain, "requires TLS")?;
    let other = c.dir.path().join("other-ca");
    let out =
        run_eddyctl(&["cert", "create-ca", "--dir", other.to_str().context("path")?], &[], None, SHORT)?;
    ensure!(out.ok(), "{out:?}");
    let wrong_ca = vec![("--ca", other.join("ca.pem").display().to_string())];
    let out = ctl(&wrong_ca, &all, &["--request-timeout", "3s", "topic", "list"], None)?;
    refused(&out, "not issued by the CA given with --ca")?;
    let first = c.node(1).client_addr.clone();
    let out = ctl(&admin, &format!("http://{first}"), &["topic", "list"], None)?;
    refused(&out, "plaintext (http://) address")?;
    let out = ctl(&admin, &format!("https://{first}"), &["topic", "list"], None)?;
    ensure!(out.ok(), "an https:// address with the right CA works: {out:?}");

    // Acceptance 2: only nodes of the cluster speak Raft; a node certificate is no user.
    let raft = c.node(1).raft_addr.clone();
    let out = ctl(&admin, &raft, &["--request-timeout", "3s", "topic", "list"], None)?;
    refused(&out, "for the cluster's nodes only")?;
    let out = ctl(&s.anonymous(), &raft, &["--request-timeout", "3s", "topic", "list"], None)?;
    ensure!(!out.ok(), "the Raft port takes no connection without a certificate: {out:?}");
    let out = ctl(&s.cert_of("node-5"), &raft, &["--request-timeout", "3s", "topic", "list"], None)?;
    refused(&out, "node 5 is not a member")?;
    let out = ctl(&s.cert_of("node-2"), &all, &["topic", "list"], None)?;
    refused(&out, "Node:2 is a node identity and has no user rights")?;

    // Acceptance 3 and 5: alice, her token, and a prefixed write binding.
    let out = ctl(&admin, &all, &["user", "create", "alice"], None)?;
    ensure!(out.ok(), "user create: {out:?}");
    let created = out.json()?;
    ensure!(created["user"] == "alice", "{created}");
    let token = created["token"].as_str().context("token")?.to_owned();
    let alice = s.token(&token);
    let out = ctl(&s.anonymous(), &all, &["topic", "list"], None)?;
    refused(&out, "no credentials")?;
    let wrong = format!("alice.{}", "A".repeat(43));
    let out = ctl(&s.token(&wrong), &all, &["topic", "list"], None)?;
    refused(&out, "the token is not valid")?;
    let out = ctl(&alice, &all, &["produce", "orders.eu"], Some(b"x\n"))?;
    refused(&out, "User:alice may not")?;
    let grant = acl("add");
    let out = ctl(&admin, &all, &grant, None)?;
    ensure!(out.ok() && out.json()?["added"] == true, "acl add: {out:?}");
    let out = ctl(&admin, &all, &["acl", "list"], None)?;
    ensure!(
        out.ok() && out.json()?["bindings"].as_array().is_some_and(|b| b.len() == 1),
        "acl list: {out:?}"
    );
    let out = wait_for("alice's write to be allowed", SHORT, || {
        ctl(&alice, &all, &["produce", "orders.eu", "--partition", "0"], Some(b"by-alice\n"))
            .ok()
            .filter(CtlOutput::ok)
    })?;
    ensure!(out.json_lines()?.len() == 1, "{out:?}");
    let out = ctl(&alice, &all, &["produce", "payments"], Some(b"x\n"))?;
    refused(&out, "User:alice may not describe topic \"payments\"")?;
    let out = ctl(&alice, &all, &["topic", "delete", "orders.eu"], None)?;
    refused(&out, "User:alice may not delete topic \"orders.eu\"")?;
    let out = ctl(&alice, &all, &["topic", "list"], None)?;
    let listed: Vec<String> = out.json()?["topics"]
        .as_array()
        .context("topics")?
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    ensure!(listed == ["orders.eu"], "alice's listing is filtered to what she may describe: {listed:?}");
    let out = ctl(&alice, &all, &["node", "list"], None)?;
    refused(&out, "User:alice may not describe the cluster")?;

    // Failures are counted by reason (before the restart below resets the counters).
    let reasons = auth_failures(c)?;
    for reason in
        ["bad_token", "no_credentials", "plaintext", "node_as_user", "not_a_node", "node_not_member"]
    {
        ensure!(reasons.contains(&format!("reason=\"{reason}\"")), "no {reason} counted: {reasons}");
    }

    // Acceptance 6: users and bindings survive a restart of every node, the loss of the
    // metadata leader, and reach a node that joins later.
    for id in 1..=3 {
        ensure!(c.stop_node(id, Duration::from_secs(20))?, "node {id} did not stop");
    }
    for id in 1..=3 {
        c.start_node(id)?;
    }
    let out = ctl(&admin, &all, &health, None)?;
    ensure!(out.ok(), "not healthy after the restart: {out:?}");
    wait_for("alice to write after the restart", Duration::from_secs(30), || {
        ctl(&alice, &all, &["produce", "orders.eu", "--partition", "0"], Some(b"after-restart\n"))
            .ok()
            .filter(CtlOutput::ok)
    })?;
    let out = ctl(&admin, &all, &["node", "list"], None)?;
    let leader = out.json()?["metadata_leader"].as_u64().context("metadata leader")?;
    c.kill_node(leader)?;
    let rest: Vec<String> =
        c.nodes.values().filter(|n| n.id != leader).map(|n| n.client_addr.clone()).collect();
    let rest = rest.join(",");
    wait_for("alice to write with the metadata leader gone", Duration::from_secs(30), || {
        ctl(&alice, &rest, &["produce", "orders.eu", "--partition", "0"], Some(b"after-failover\n"))
            .ok()
            .filter(CtlOutput::ok)
    })?;
    c.start_node(leader)?;
    c.join_node(4)?;
    let four = c.node(4).client_addr.clone();
    wait_for("node 4 to join and serve alice", Duration::from_secs(60), || {
        ctl(&alice, &four, &["user", "whoami"], None).ok().filter(|o| o.ok())
    })?;
    let out = ctl(&alice, &four, &["topic", "list"], None)?;
    ensure!(
        out.ok() && out.stdout.contains("orders.eu") && !out.stdout.contains("payments"),
        "node 4: {out:?}"
    );

    // The binding removed: refused on every node.
    let revoke = acl("remove");
    let out = ctl(&admin, &all, &revoke, None)?;
    ensure!(out.ok() && out.json()?["removed"] == true, "acl remove: {out:?}");
    let all4 = c.brokers();
    wait_for("alice to be refused once the binding is gone", SHORT, || {
        ctl(&alice, &all4, &["produce", "orders.eu", "--partition", "0"], Some(b"x\n"))
            .ok()
            .filter(|o| o.stderr.contains("User:alice may not"))
    })?;

    // Acceptance 3: a deleted user's token is refused on every node once the deletion is
    // applied there; how long that takes is printed.
    let out = ctl(&admin, &all4, &["user", "delete", "alice"], None)?;
    ensure!(out.ok() && out.json()?["deleted"] == true, "user delete: {out:?}");
    let deleted_at = Instant::now();
    for n in c.nodes.values() {
        wait_for("the deletion to reach the node", SHORT, || {
            ctl(&alice, &n.client_addr, &["user", "whoami"], None)
                .ok()
                .filter(|o| o.stderr.contains("the token is not valid"))
        })?;
        eprintln!(
            "node {}: the deleted user's token refused {:?} after the deletion",
            n.id,
            deleted_at.elapsed()
        );
    }

    // Acceptance 7: the token appears in no file of any node, no log, no metrics.
    let secret = token.rsplit_once('.').context("token shape")?.1.as_bytes().to_vec();
    let found = files_containing(c.dir.path(), &secret)?;
    ensure!(found.is_empty(), "the token's secret is in {found:?}");
    let reasons = auth_failures(c)?;
    ensure!(
        reasons.contains("reason=\"unknown_user\""),
        "the deleted user's refusals are counted: {reasons}"
    );
    for n in c.nodes.values() {
        ensure!(
            !metrics(&n.http_addr)?.contains(std::str::from_utf8(&secret)?),
            "node {}'s metrics show the token",
            n.id
        );
    }
    Ok(())
}

/// Runs `program ARGS` with `stdin`, killed (by its PID) past `timeout`: (success, stdout,
/// stderr).
fn run_bounded(
    program: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(bool, String, String)> {
    use std::process::Stdio;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let deadline = Instant::now() + timeout;
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = waiter.join().map_err(|_| anyhow::anyhow!("waiter panicked"))??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Acceptance 5 with Kafka clients: kcat and confluent-kafka over SASL_SSL, with PLAIN and
/// both SCRAMs, allowed on `orders.` and refused elsewhere and once the binding is gone; and a
/// client certificate as the Kafka principal.
#[test]
fn kafka_clients_authenticate_with_sasl_over_tls_and_obey_acls() -> anyhow::Result<()> {
    let kcat = eddy_tests::program("kcat", "kcat")?;
    let python = eddy_tests::kafka_python()?;
    let c = Cluster::start_secure(3, true)?;
    let s = c.secure.clone().context("secure")?;
    let result = kafka_secure(&c, &s, &kcat, &python);
    if result.is_err() {
        for id in c.nodes.keys() {
            eprintln!("--- node {id}\n{}", c.log_tail(*id, 30));
        }
    }
    result
}

fn kafka_secure(
    c: &Cluster,
    s: &eddy_tests::Secure,
    kcat: &std::path::Path,
    python: &std::path::Path,
) -> anyhow::Result<()> {
    let all = c.brokers();
    let admin = s.admin();
    let ctl = |args: &[&str]| eddy_tests::ctl_as(&admin, &all, args, None, CTL_TIMEOUT);
    let out = ctl(&["cluster", "health", "--exit-when-healthy", "--timeout", "40s"])?;
    ensure!(out.ok(), "not healthy: {out:?}");
    c.wait_for_kafka()?;
    for t in ["orders.eu", "payments"] {
        let out = ctl(&["topic", "create", t, "--partitions", "1", "--replication-factor", "3"])?;
        ensure!(out.ok(), "{out:?}");
        c.wait_for_leaders(t, 3)?;
    }
    let out = ctl(&["user", "create", "alice"])?;
    ensure!(out.ok(), "{out:?}");
    let token = out.json()?["token"].as_str().context("token")?.to_owned();
    let grant = acl("add");
    ensure!(ctl(&grant)?.ok());
    let bootstrap = c.kafka_bootstrap();
    let ca = s.path("ca.pem");
    let sasl = |mechanism: &str, password: &str| -> Vec<String> {
        [
            "-b",
            &bootstrap,
            "-X",
            "security.protocol=SASL_SSL",
            "-X",
            &format!("ssl.ca.location={ca}"),
            "-X",
            &format!("sasl.mechanisms={mechanism}"),
            "-X",
            "sasl.username=alice",
            "-X",
            &format!("sasl.password={password}"),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let kcat_produce = |mechanism: &str, password: &str, topic: &str| -> anyhow::Result<(bool, String)> {
        let mut args = sasl(mechanism, password);
        args.extend(["-P", "-t", topic, "-p", "0", "-X", "message.timeout.ms=10000"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) =
            run_bounded(kcat, &args, Some(&format!("kcat-{mechanism}\n")), Duration::from_secs(60))?;
        Ok((ok && !err.contains("ERROR") && !err.contains("failed"), err))
    };
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let (ok, err) = kcat_produce(mechanism, &token, "orders.eu")?;
        ensure!(ok, "kcat {mechanism} to orders.eu: {err}");
        let (ok, err) = kcat_produce(mechanism, &token, "payments")?;
        ensure!(!ok && err.to_lowercase().contains("authoriz"), "kcat {mechanism} to payments: {err}");
        let wrong = format!("alice.{}", "B".repeat(43));
        let (ok, err) = kcat_produce(mechanism, &wrong, "orders.eu")?;
        ensure!(
            !ok && err.to_lowercase().contains("authentication"),
            "kcat {mechanism} with a wrong token: {err}"
        );

        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kafka_clients.py");
        let script = script.to_str().context("path")?;
        let py = |topic: &str| -> anyhow::Result<serde_json::Value> {
            let (ok, out, err) = run_bounded(
                python,
                &[script, "secure-produce", &bootstrap, topic, &ca, mechanism, "alice", &token, "5"],
                None,
                Duration::from_secs(90),
            )?;
            ensure!(ok, "confluent-kafka {mechanism}: {err}");
            Ok(serde_json::from_str(out.trim())?)
        };
        let allowed = py("orders.eu")?;
        ensure!(allowed["delivered"] == 5, "confluent-kafka {mechanism} to orders.eu: {allowed}");
        let refused = py("payments")?;
        ensure!(
            refused["delivered"] == 0 && refused["errors"].to_string().contains("AUTHORIZATION"),
            "confluent-kafka {mechanism} to payments: {refused}"
        );
    }
    // A client certificate is a Kafka principal too: the superuser's works without SASL.
    let mut args: Vec<String> =
        ["-b", &bootstrap, "-X", "security.protocol=SSL", "-X", &format!("ssl.ca.location={ca}")]
            .iter()
            .map(|a| a.to_string())
            .collect();
    args.extend([
        "-X".into(),
        format!("ssl.certificate.location={}", s.path("admin.pem")),
        "-X".into(),
        format!("ssl.key.location={}", s.path("admin.key")),
    ]);
    args.extend(["-C", "-t", "orders.eu", "-p", "0", "-o", "beginning", "-e", "-q"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run_bounded(kcat, &args, None, Duration::from_secs(60))?;
    ensure!(
        ok && out.contains("kcat-PLAIN") && out.contains("SCRAM-SHA-512-4"),
        "admin by certificate reads: {out} {err}"
    );
    // Plaintext to the TLS Kafka listener gets nowhere.
    let (ok, _, _) = run_bounded(kcat, &["-b", &bootstrap, "-L", "-m", "5"], None, Duration::from_secs(30))?;
    ensure!(!ok, "kcat in plaintext listed the cluster");
    // The binding removed: refused, also on a connection opened before.
    let revoke = acl("remove");
    ensure!(ctl(&revoke)?.ok());
    wait_for("alice's Kafka writes to be refused", SHORT, || {
        kcat_produce("SCRAM-SHA-256", &token, "orders.eu").ok().filter(|(ok, _)| !ok)
    })?;
    Ok(())
}

/// A producer over eddyctl as `who`, fed `line_bytes`-byte events by a thread (at most
/// `rate` bytes/s when given) until stopped; the acknowledgements are counted as they come.
struct QuotaProducer {
    child: std::process::Child,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl QuotaProducer {
    fn start(
        who: &[(&str, String)],
        brokers: &str,
        topic: &str,
        line_bytes: usize,
        rate: Option<u64>,
    ) -> anyhow::Result<Self> {
        use std::io::BufRead;
        use std::process::Stdio;
        use std::sync::atomic::Ordering;
        let mut args: Vec<String> =
            vec!["--brokers".into(), brokers.into(), "--output".into(), "json".into()];
        for (flag, value) in who {
            args.push((*flag).into());
            args.push(value.clone());
        }
        // One request in flight: a throttled producer's requests wait their turn one by one
        // rather than all at once past the delivery timeout.
        args.extend(
            ["produce", topic, "--partition", "0", "--max-in-flight-requests", "1"].map(String::from),
        );
        let mut child = std::process::Command::new(eddy_tests::binary("eddyctl"))
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (stop_w, line) = (stop.clone(), format!("{}\n", "q".repeat(line_bytes - 1)));
        let writer = std::thread::spawn(move || {
            let start = Instant::now();
            let mut sent = 0u64;
            while !stop_w.load(Ordering::Relaxed) {
                if let Some(rate) = rate {
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait.min(Duration::from_millis(20)));
                        continue;
                    }
                }
                if stdin.write_all(line.as_bytes()).is_err() {
                    break;
                }
                sent += line.len() as u64;
            }
        });
        let acked_r = acked.clone();
        let bytes = line_bytes as u64 - 1;
        // Ends when eddyctl exits and closes its stdout.
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if l.contains("\"offset\"") {
                    acked_r.fetch_add(bytes, Ordering::Relaxed);
                }
            }
        });
        Ok(Self { child, stop, acked, writer: Some(writer) })
    }

    fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for QuotaProducer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Acceptance 9: a produce quota of 1 MB/s holds within 20% over 30 s, while another user
/// producing at 4 MB/s on the same partition leader gets all of it through.
#[test]
fn a_produce_quota_holds_and_spares_other_users() -> anyhow::Result<()> {
    const QUOTA: u64 = 1_000_000;
    const BOB_RATE: u64 = 4_000_000;
    const RUN: Duration = Duration::from_secs(30);
    // Requests of at most 256 KiB, so that what passes arrives in steps far below the quota.
    let limits = "[limits]\nmax_event_bytes = 65536\nmax_request_bytes = 262144\n";
    let c = Cluster::start_secure_with(3, false, limits)?;
    let s = c.secure.clone().context("secure")?;
    let all = c.brokers();
    let admin = s.admin();
    let ctl = |args: &[&str]| eddy_tests::ctl_as(&admin, &all, args, None, CTL_TIMEOUT);
    ensure!(ctl(&["cluster", "health", "--exit-when-healthy", "--timeout", "40s"])?.ok());
    ensure!(ctl(&["topic", "create", "metered", "--partitions", "1", "--replication-factor", "3"])?.ok());
    c.wait_for_leaders("metered", 3)?;
    let mut tokens = Vec::new();
    for user in ["alice", "bob"] {
        let out = ctl(&["user", "create", user])?;
        ensure!(out.ok(), "{out:?}");
        tokens.push(out.json()?["token"].as_str().context("token")?.to_owned());
    }
    let grant =
        ["acl", "add", "--principal", "User:*", "--allow", "--operation", "write", "--topic", "metered"];
    ensure!(ctl(&grant)?.ok());
    let out = ctl(&["quota", "set", "--user", "alice", "--producer-byte-rate", &QUOTA.to_string()])?;
    ensure!(out.ok(), "{out:?}");
    let out = ctl(&["quota", "list"])?;
    ensure!(out.json()?["quotas"][0]["producer_byte_rate"] == QUOTA, "{out:?}");

    let alice = QuotaProducer::start(&s.token(&tokens[0]), &all, "metered", 10_000, None)?;
    let bob = QuotaProducer::start(&s.token(&tokens[1]), &all, "metered", 10_000, Some(BOB_RATE))?;
    let started = Instant::now();
    // The first acknowledgements mark the start of the measured run.
    wait_for("both producers' first acknowledgements", SHORT, || {
        (alice.acked() > 0 && bob.acked() > 0).then_some(())
    })?;
    let (a0, b0, t0) = (alice.acked(), bob.acked(), Instant::now());
    while t0.elapsed() < RUN {
        std::thread::sleep(Duration::from_millis(200));
    }
    let secs = t0.elapsed().as_secs_f64();
    let alice_rate = (alice.acked() - a0) as f64 / secs;
    let bob_rate = (bob.acked() - b0) as f64 / secs;
    eprintln!(
        "over {secs:.1} s (after {:?} to start): alice {alice_rate:.0} B/s under a {QUOTA} B/s quota, bob {bob_rate:.0} B/s offered {BOB_RATE} B/s",
        t0.duration_since(started)
    );
    ensure!(
        (0.8 * QUOTA as f64..=1.2 * QUOTA as f64).contains(&alice_rate),
        "alice's rate {alice_rate:.0} B/s is not within 20% of her quota"
    );
    ensure!(bob_rate >= 0.85 * BOB_RATE as f64, "bob got {bob_rate:.0} B/s of the {BOB_RATE} B/s he offered");
    Ok(())
}

/// Acceptance 8, on a node that allows 20 connections per listener: connections past the cap
/// are closed at once; a client that opens a connection to a TLS port and never speaks is
/// closed after the handshake deadline; an event over the size limit is refused; and through
/// all of it the node stays healthy and serves.
#[test]
fn connection_caps_handshake_deadlines_and_size_limits_hold() -> anyhow::Result<()> {
    const CAP: usize = 20;
    let c = Cluster::start_secure_with(1, false, &format!("max_connections = {CAP}\n"))?;
    let s = c.secure.clone().context("secure")?;
    let addr = c.node(1).client_addr.clone();
    let admin = s.admin();
    let ctl =
        |args: &[&str], stdin: Option<&[u8]>| eddy_tests::ctl_as(&admin, &addr, args, stdin, CTL_TIMEOUT);
    ensure!(ctl(&["cluster", "health", "--exit-when-healthy", "--timeout", "40s"], None)?.ok());
    ensure!(
        ctl(&["topic", "create", "limits", "--partitions", "1", "--replication-factor", "1"], None)?.ok()
    );
    c.wait_for_leaders("limits", 1)?;

    // CAP silent connections take every slot (they have not even begun TLS).
    let opened = Instant::now();
    let mut silent: Vec<std::net::TcpStream> =
        (0..CAP).map(|_| std::net::TcpStream::connect(&addr)).collect::<Result<_, _>>()?;
    let closed_at_once = |s: &mut std::net::TcpStream| -> anyhow::Result<bool> {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut b = [0u8; 1];
        Ok(matches!(s.read(&mut b), Ok(0))
            || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset))
    };
    // One more is closed at once.
    let mut extra = std::net::TcpStream::connect(&addr)?;
    ensure!(closed_at_once(&mut extra)?, "a connection past the cap of {CAP} was kept open");
    // The silent ones are closed at the handshake deadline (10 s), not before 9 s.
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        ensure!(matches!(r, Ok(0)) || r.is_err(), "a silent connection got data: {r:?}");
    }
    let took = opened.elapsed();
    eprintln!("silent TLS connections closed {took:?} after they opened");
    ensure!(took >= Duration::from_secs(9) && took < Duration::from_secs(20), "closed after {took:?}");
    drop(silent);
    // The slots are free again, and the node serves.
    let out = ctl(&["produce", "limits", "--partition", "0"], Some(b"after\n"))?;
    ensure!(out.ok(), "the node serves after its slots were taken: {out:?}");

    // An event over max_event_bytes (1 MiB) is refused with the limit named; the node is fine.
    let big = format!("{}\n", "x".repeat((1 << 20) + 10));
    let out = ctl(&["produce", "limits", "--partition", "0"], Some(big.as_bytes()))?;
    ensure!(!out.ok() && out.stderr.contains("max_event_bytes"), "an oversized event: {out:?}");
    let out = ctl(&["cluster", "health"], None)?;
    ensure!(out.ok(), "healthy after the refusals: {out:?}");
    let reasons = auth_failures(&c)?;
    for reason in ["connection_limit", "handshake_timeout"] {
        ensure!(reasons.contains(&format!("reason=\"{reason}\"")), "no {reason} counted: {reasons}");
    }
    Ok(())
}

/// Acceptance 8: a client that opens HTTP/2 streams and resets them at once (CVE-2023-44487)
/// is cut off by the client listener, and the node serves everyone else.
#[test]
fn rapid_resets_are_cut_off() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let addr = c.node(1).client_addr.clone();
    let out = c.ctl(&["cluster", "health", "--exit-when-healthy", "--timeout", "40s"], None, CTL_TIMEOUT)?;
    ensure!(out.ok(), "{out:?}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (sent, cut) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        let (mut client, conn) = h2::client::handshake(tcp).await?;
        let driver = tokio::spawn(conn);
        let mut sent = 0usize;
        let mut cut = false;
        // Rounds of 50 calls that wait for their request bodies, all reset once the server has
        // begun them.
        'rounds: for _ in 0..200 {
            let mut streams = Vec::new();
            for _ in 0..50 {
                let req = http::Request::post(format!("http://{addr}/eddy.v1.Broker/Fetch"))
                    .header("content-type", "application/grpc")
                    .body(())?;
                let ready = tokio::time::timeout(Duration::from_secs(5), client.clone().ready()).await;
                let Ok(Ok(mut ready)) = ready else {
                    cut = true;
                    break 'rounds;
                };
                match ready.send_request(req, false) {
                    Ok((_, stream)) => streams.push(stream),
                    Err(_) => {
                        cut = true;
                        break 'rounds;
                    }
                }
                client = ready;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            for mut stream in streams {
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
        cut |= matches!(ended, Ok(Ok(Err(_))) | Ok(Ok(Ok(()))));
        anyhow::Ok((sent, cut))
    })?;
    eprintln!("the connection was cut off after {sent} reset streams");
    ensure!(cut && sent < 10_000, "{sent} rapid resets were all accepted");
    let out = c.ctl(&["topic", "list"], None, CTL_TIMEOUT)?;
    ensure!(out.ok(), "the node serves after the flood: {out:?}");
    Ok(())
}
