//! `eddy-node`: runs one broker node (`--config FILE`), or a local development cluster of
//! several nodes as child processes (`eddy-node dev`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;
use eddy_node::config::NodeConfig;
use eddy_node::env::NodeEnv;
use eddy_node::env::ProbeSocket;
use eddy_node::env::SystemClock;
use eddy_node::env::tcp_incoming;
use eddy_raft::kv::SledStateStore;
use eddy_raft::transport::TcpConnector;
use eddy_raft::vfs::RealVfs;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::error;
use tracing::info;
use tracing::warn;

mod dev;

/// mimalloc instead of glibc's malloc: a node allocates and frees small objects on every
/// worker thread (Raft messages, metrics, status reports), and glibc's arenas spent a tenth of
/// the CPU of a failover at 3,000 partitions in `_int_malloc`, `unlink_chunk` and
/// `malloc_consolidate` (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long a graceful shutdown waits for this node's leaderships to move elsewhere.
const HANDOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(name = "eddy-node", version, about = "An Eddy broker node")]
struct Cli {
    /// The node's TOML config file.
    #[arg(long, env = "EDDY_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `node_id`.
    #[arg(long, env = "EDDY_NODE_ID")]
    node_id: Option<u64>,
    /// Overrides `data_dir`.
    #[arg(long, env = "EDDY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides `client_addr`.
    #[arg(long, env = "EDDY_CLIENT_ADDR")]
    client_addr: Option<String>,
    /// Overrides `raft_addr`.
    #[arg(long, env = "EDDY_RAFT_ADDR")]
    raft_addr: Option<String>,
    /// Overrides `http_addr`.
    #[arg(long, env = "EDDY_HTTP_ADDR")]
    http_addr: Option<String>,
    /// Overrides `kafka_addr` (turns the Kafka listener on).
    #[arg(long, env = "EDDY_KAFKA_ADDR")]
    kafka_addr: Option<String>,
    /// Overrides `rack`.
    #[arg(long, env = "EDDY_RACK")]
    rack: Option<String>,
    /// Log format.
    #[arg(long, env = "EDDY_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Starts a local cluster of several nodes as child processes; Ctrl-C stops them all.
    Dev(dev::DevArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=error,sled=warn,h2=warn,hyper=warn")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // ring, explicitly: with two providers linked in, rustls would refuse to guess.
    eddy_node::security::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    match cli.command {
        Some(Command::Dev(args)) => rt.block_on(dev::run(args)),
        None => rt.block_on(run_node(cli)),
    }
}

async fn bind(what: &str, addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("bind {what} {addr}"))
}

async fn run_node(cli: Cli) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let mut config = match &cli.config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::default(),
    };
    if let Some(v) = cli.node_id {
        config.node_id = v;
    }
    if let Some(v) = cli.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = cli.client_addr {
        config.client_addr = v;
    }
    if let Some(v) = cli.raft_addr {
        config.raft_addr = v;
    }
    if let Some(v) = cli.http_addr {
        config.http_addr = v;
    }
    if let Some(v) = cli.kafka_addr {
        config.kafka_addr = Some(v);
    }
    if let Some(v) = cli.rack {
        config.rack = Some(v);
    }
    config.validate().context("invalid configuration")?;
    let file_limit = raise_open_file_limit();
    let max_open_log_files = match config.max_open_log_files {
        0 => (file_limit / 2).max(64),
        n => n,
    };
    info!(max_open_log_files, open_file_limit = file_limit, "log files kept open at most");
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data_dir {}", config.data_dir.display()))?;
    let vfs = RealVfs::open(usize::try_from(max_open_log_files).unwrap_or(usize::MAX), &config.data_dir)
        .context("start the log file system")?;
    let state_store = SledStateStore::open(&config.data_dir.join("state")).context("open the state store")?;
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("read OS randomness: {e}"))?;
    let env = NodeEnv {
        vfs: Arc::new(vfs),
        state_store: Arc::new(state_store),
        clock: Arc::new(SystemClock),
        connector: Arc::new(TcpConnector),
        seed: u64::from_le_bytes(seed),
        replica_open_delay: std::time::Duration::ZERO,
        #[cfg(feature = "planted-bugs")]
        bugs: Default::default(),
    };
    let client = bind("client_addr", &config.client_addr).await?;
    let raft = bind("raft_addr", &config.raft_addr).await?;
    let http = bind("http_addr", &config.http_addr).await?;
    let kafka = match &config.kafka_addr {
        Some(addr) => Some(bind("kafka_addr", addr).await?),
        None => None,
    };
    info!(node = config.node_id, client = %config.client_addr, raft = %config.raft_addr, http = %config.http_addr, data_dir = %config.data_dir.display(), "starting");
    // Liveness probes use the Raft port number over UDP.
    let probes = std::net::UdpSocket::bind(&config.raft_addr)
        .with_context(|| format!("bind raft_addr {} (UDP, for liveness probes)", config.raft_addr))?;
    let probes = ProbeSocket::Thread(probes);
    let kafka_settings = eddy_node::api::kafka::Settings::from_config(&config);
    let node = eddy_node::node::start(config, env, tcp_incoming(client), tcp_incoming(raft), probes).await?;
    let http_cancel = CancellationToken::new();
    let http_task = tokio::spawn(eddy_node::http::serve(http, node.broker.clone(), http_cancel.clone()));
    let kafka_task = kafka.map(|l| {
        tokio::spawn(eddy_node::api::kafka::serve(
            l,
            node.broker.clone(),
            kafka_settings,
            http_cancel.clone(),
        ))
    });

    // A write the disk could not make durable stops the node (see `eddy_node::disk`): it must
    // not go on acknowledging, and a supervisor that restarts it gets a recovery from disk.
    let storage = node.storage.clone();
    let failed = tokio::select! {
        () = signals.recv() => None,
        why = storage.wait() => Some(why),
    };
    match &failed {
        None => info!("shutting down: handing leaderships to other replicas first"),
        Some(why) => error!("stopping after a storage failure ({why}): handing leaderships over first"),
    }
    let left = tokio::select! {
        n = node.hand_over_leadership(HANDOVER_TIMEOUT) => n,
        () = signals.recv() => usize::MAX,
    };
    match left {
        0 => info!("leaderships handed over"),
        usize::MAX => warn!("second signal: not waiting for leaderships to move"),
        n => warn!("{n} groups still led by this node after {HANDOVER_TIMEOUT:?}; stopping anyway"),
    }
    http_cancel.cancel();
    let stop = async {
        node.shutdown().await;
        let _ = http_task.await;
        if let Some(t) = kafka_task {
            let _ = t.await;
        }
    };
    tokio::select! {
        () = stop => info!("stopped"),
        () = signals.recv() => warn!("second signal: exiting without a clean shutdown"),
    }
    match failed {
        None => Ok(()),
        Some(why) => anyhow::bail!(
            "stopped after a storage failure: {why}; check the disk (dmesg), reboot the machine (or drop the \
             page cache: the cache may hold writes the disk never got), then start the node again: it \
             recovers what the disk holds and its peers send it the rest"
        ),
    }
}

/// Raises the soft open-file limit to the hard limit (which an unprivileged process may do) and
/// returns the limit in effect. Log files are opened on demand within half of it (see
/// `RealVfs`); the rest is for connections, the state store and reopening.
fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::Resource;
    use nix::sys::resource::getrlimit;
    use nix::sys::resource::setrlimit;
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                info!(from = soft, to = hard, "raised the open-file limit");
                hard
            }
            Err(e) => {
                warn!(soft, hard, "could not raise the open-file limit: {e}");
                soft
            }
        },
        Ok((soft, _)) => {
            info!(limit = soft, "open-file limit (already at the hard limit)");
            soft
        }
        Err(e) => {
            warn!("could not read the open-file limit: {e}; assuming 1024");
            1024
        }
    }
}

/// SIGTERM and SIGINT, installed once so that no signal is missed between waits.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::SignalKind;
        use tokio::signal::unix::signal;
        Ok(Self {
            term: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
