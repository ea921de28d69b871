//! `eddy-node dev`: a local cluster for development, as child processes of this one.
//!
//! Node `i` (from 1) gets client port `base + i - 1`, Raft port `base + 100 + i - 1` and HTTP
//! port `base + 200 + i - 1`, Kafka port `base + 300 + i - 1`, rack `a`, `b`, `c`, `a`, … (so
//! that a Kafka client's `client.rack` finds a replica in its rack), and its data under `<data-dir>/node-<i>`. Run again with the same
//! data directory, the cluster resumes where it stopped. Ctrl-C (or SIGTERM) stops the children
//! one by one with SIGTERM, and with SIGKILL any that has not stopped after a grace period.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use eddy_node::config::MemberConfig;
use eddy_node::config::NodeConfig;
use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::process::Command;

/// How long all children together get to stop before the rest are killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Where the nodes keep their data, configs and logs.
    #[arg(long, default_value = "./data/dev")]
    data_dir: PathBuf,
    /// Client port of node 1; see the module docs for the others.
    #[arg(long, default_value_t = 9091)]
    base_port: u16,
    /// No TLS and no authentication: every listener in plaintext, open to anyone who can
    /// reach it (loopback only).
    #[arg(long)]
    insecure: bool,
}

/// The bootstrap superuser of a secure dev cluster (its client certificate is in `certs/`).
const DEV_SUPERUSER: &str = "admin";

/// The certificates of a secure dev cluster, made on its first start under `<data-dir>/certs`
/// and kept: a CA, one certificate per node, and the superuser's client certificate.
struct DevCerts {
    dir: PathBuf,
}

impl DevCerts {
    fn ensure(data_dir: &std::path::Path, nodes: u16) -> anyhow::Result<Self> {
        let dir = data_dir.join("certs");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
        let ca = if ca_cert.exists() && ca_key.exists() {
            eddy_ops::pki::Ca::load(&std::fs::read_to_string(&ca_cert)?, &std::fs::read_to_string(&ca_key)?)
                .with_context(|| format!("load the dev CA in {}", dir.display()))?
        } else {
            let ca = eddy_ops::pki::Ca::new("Eddy dev CA")?;
            std::fs::write(&ca_cert, &ca.issued.cert_pem)?;
            eddy_ops::pki::write_private(&ca_key, &ca.issued.key_pem)?;
            ca
        };
        let write = |stem: &str, issued: eddy_ops::pki::Issued| -> anyhow::Result<()> {
            std::fs::write(dir.join(format!("{stem}.pem")), issued.cert_pem)?;
            eddy_ops::pki::write_private(&dir.join(format!("{stem}.key")), &issued.key_pem)
        };
        for i in 1..=u64::from(nodes) {
            if !dir.join(format!("node-{i}.pem")).exists() {
                write(&format!("node-{i}"), ca.node(i, &["127.0.0.1".into(), "localhost".into()])?)?;
            }
        }
        if !dir.join(format!("{DEV_SUPERUSER}.pem")).exists() {
            write(DEV_SUPERUSER, ca.client(DEV_SUPERUSER)?)?;
        }
        let certs = Self { dir };
        // librdkafka's settings for the superuser (kcat reads them from $KCAT_CONFIG;
        // confluent-kafka takes the same keys).
        let kafka = format!(
            "security.protocol=SSL\nssl.ca.location={}\nssl.certificate.location={}\nssl.key.location={}\n",
            certs.path("ca.pem").display(),
            certs.path(&format!("{DEV_SUPERUSER}.pem")).display(),
            certs.path(&format!("{DEV_SUPERUSER}.key")).display()
        );
        std::fs::write(certs.dir.join("kafka.properties"), kafka).context("write kafka.properties")?;
        Ok(certs)
    }

    fn path(&self, name: &str) -> PathBuf {
        std::path::absolute(self.dir.join(name)).unwrap_or_else(|_| self.dir.join(name))
    }
}

fn configs(args: &DevArgs, certs: Option<&DevCerts>) -> anyhow::Result<Vec<NodeConfig>> {
    anyhow::ensure!((1..=99).contains(&args.nodes), "--nodes: must be between 1 and 99");
    anyhow::ensure!(
        args.base_port.checked_add(300 + args.nodes).is_some(),
        "--base-port: too high for {} nodes",
        args.nodes
    );
    let port = |offset: u16, i: u16| format!("127.0.0.1:{}", args.base_port + offset + i - 1);
    let members: Vec<MemberConfig> = (1..=args.nodes)
        .map(|i| MemberConfig { id: u64::from(i), client_addr: port(0, i), raft_addr: port(100, i) })
        .collect();
    Ok((1..=args.nodes)
        .map(|i| NodeConfig {
            node_id: u64::from(i),
            data_dir: args.data_dir.join(format!("node-{i}")),
            client_addr: port(0, i),
            raft_addr: port(100, i),
            http_addr: port(200, i),
            kafka_addr: Some(port(300, i)),
            rack: Some(rack(i)),
            // As a Kafka dev broker does: a Kafka client's first produce creates its topic.
            auto_create_topics: true,
            default_partitions: 3,
            initial_members: members.clone(),
            tls: certs.map(|c| eddy_node::config::TlsConfig {
                cert: c.path(&format!("node-{i}.pem")),
                key: c.path(&format!("node-{i}.key")),
                ca: c.path("ca.pem"),
                require_client_cert: false,
                http: false,
            }),
            authentication: eddy_node::config::Authentication {
                client: certs.is_some(),
                kafka: certs.is_some(),
            },
            superusers: if certs.is_some() { vec![format!("User:{DEV_SUPERUSER}")] } else { Vec::new() },
            ..NodeConfig::default()
        })
        .collect())
}

/// Node `i`'s rack: `a`, `b`, `c`, then around again.
fn rack(i: u16) -> String {
    char::from(b'a' + ((i - 1) % 3) as u8).to_string()
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let stop_signal = signal()?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("create {}", args.data_dir.display()))?;
    let certs = if args.insecure { None } else { Some(DevCerts::ensure(&args.data_dir, args.nodes)?) };
    let configs = configs(&args, certs.as_ref())?;
    let exe = std::env::current_exe().context("find the eddy-node executable")?;
    let mut children: Vec<(u64, Child)> = Vec::new();
    for c in &configs {
        let path = args.data_dir.join(format!("node-{}.toml", c.node_id));
        std::fs::write(&path, c.to_toml()).with_context(|| format!("write {}", path.display()))?;
        let log_path = args.data_dir.join(format!("node-{}.log", c.node_id));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let child = Command::new(&exe)
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            // Its own process group: Ctrl-C in the terminal reaches only this process, which
            // then stops the nodes in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("start node {}", c.node_id))?;
        children.push((c.node_id, child));
    }
    let brokers: Vec<&str> = configs.iter().map(|c| c.client_addr.as_str()).collect();
    let brokers = brokers.join(",");
    println!("Eddy dev cluster: {} nodes, data in {}", configs.len(), args.data_dir.display());
    for c in &configs {
        println!(
            "  node {}: client {}  raft {}  http {}  kafka {}  rack {}  log {}",
            c.node_id,
            c.client_addr,
            c.raft_addr,
            c.http_addr,
            c.kafka_addr.as_deref().unwrap_or("-"),
            c.rack.as_deref().unwrap_or("-"),
            args.data_dir.join(format!("node-{}.log", c.node_id)).display()
        );
    }
    println!("brokers: {brokers}");
    println!("  export EDDY_BROKERS={brokers}");
    match &certs {
        Some(c) => {
            // The superuser's credentials, for eddyctl; printed as paths, never as secrets.
            println!("  export EDDY_CA={}", c.path("ca.pem").display());
            println!("  export EDDY_CERT={}", c.path(&format!("{DEV_SUPERUSER}.pem")).display());
            println!("  export EDDY_KEY={}", c.path(&format!("{DEV_SUPERUSER}.key")).display());
            println!("  eddyctl cluster status");
            println!(
                "  (TLS on the client and Raft ports; you are User:{DEV_SUPERUSER}, a superuser. eddyctl user create NAME makes more users)"
            );
        }
        None => {
            println!("  eddyctl cluster status");
            println!("  (--insecure: no TLS, no authentication)");
        }
    }
    let kafka: Vec<&str> = configs.iter().filter_map(|c| c.kafka_addr.as_deref()).collect();
    println!("kafka bootstrap servers: {}", kafka.join(","));
    if let Some(c) = &certs {
        // TLS with the superuser's certificate; other users use SASL_SSL with their tokens.
        println!("  export KCAT_CONFIG={}", c.path("kafka.properties").display());
    }
    println!("  kcat -b {} -L", kafka.join(","));
    println!("  (a topic a Kafka client names is created with 3 partitions: auto_create_topics = true)");
    println!("Press Ctrl-C to stop.");

    // A node that exits (or is killed, as in the README's tour) is reported; the others keep
    // running, and it can be started again by hand with its config file.
    tokio::pin!(stop_signal);
    loop {
        let running: Vec<usize> = (0..children.len()).filter(|i| children[*i].1.id().is_some()).collect();
        if running.is_empty() {
            eprintln!("every node has exited");
            return Ok(());
        }
        tokio::select! {
            // Both arms only wait.
            () = &mut stop_signal => break,
            (id, status) = wait_first_exit(&mut children) => {
                eprintln!(
                    "node {id} exited ({status}); restart it with: eddy-node --config {}",
                    args.data_dir.join(format!("node-{id}.toml")).display()
                );
            }
        }
    }
    stop_all(&mut children).await;
    Ok(())
}

/// Waits for the first of the still-running children to exit.
async fn wait_first_exit(children: &mut [(u64, Child)]) -> (u64, String) {
    let waits = children.iter_mut().filter(|(_, c)| c.id().is_some()).map(|(id, c)| {
        let id = *id;
        Box::pin(async move {
            let s = c.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            (id, s)
        })
    });
    futures::future::select_all(waits).await.0
}

/// Installs SIGTERM and SIGINT handlers now; the future resolves on the first of them.
fn signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::SignalKind;
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Stops the nodes one at a time, last first: each hands its leaderships to nodes still
/// running (all at once, they would hand them to each other until their hand-over times out).
async fn stop_all(children: &mut [(u64, Child)]) {
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    for (id, c) in children.iter_mut().rev() {
        let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) else {
            continue;
        };
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        match tokio::time::timeout_at(deadline, c.wait()).await {
            Ok(_) => eprintln!("node {id} stopped"),
            Err(_) => {
                eprintln!("node {id} did not stop in time; killing it");
                let _ = c.kill().await;
            }
        }
    }
}
