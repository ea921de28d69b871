//! `eddyctl`: operate an Eddy cluster from the shell.
//!
//! Data goes to stdout, diagnostics to stderr. Tables by default; `--output json` prints one
//! JSON document per command, or one object per line for streams (`produce` and `consume`
//! always print JSON lines). Exit codes: 0 success, 1 failure, 2 usage error, 3 unhealthy or
//! partial (e.g. `cluster health`, a `--wait` that timed out).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::CommandFactory;
use clap::Parser;
use clap::Subcommand;
use eddy_ops::Client;
use eddy_ops::ClientConfig;
use eddy_ops::OffsetSpec;
use eddy_ops::ReplicaChoice;
use eddy_ops::output::Format;

mod admin;
mod bench;
mod data;
mod groups;
mod security;

/// Exit code for "unhealthy" or "partial".
pub const EXIT_UNHEALTHY: u8 = 3;

#[derive(Parser, Debug)]
#[command(name = "eddyctl", version, about = "Operate an Eddy cluster")]
pub struct Cli {
    /// Broker client addresses, comma-separated: `host:port`, or `https://host:port` (default
    /// 127.0.0.1:9091, or the profile's).
    #[arg(long, env = "EDDY_BROKERS", value_delimiter = ',', global = true)]
    pub brokers: Option<Vec<String>>,
    /// The cluster's CA certificate (PEM): connect with TLS and trust only it.
    #[arg(long, env = "EDDY_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) to authenticate as the user it names; needs --key.
    #[arg(long, env = "EDDY_CERT", global = true)]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM). Give it before the command (`produce --key`
    /// is an event's key), or as --tls-key anywhere.
    #[arg(long, env = "EDDY_KEY")]
    pub key: Option<std::path::PathBuf>,
    /// The same as --key, accepted after the command too.
    #[arg(long, global = true)]
    pub tls_key: Option<std::path::PathBuf>,
    /// A user's token (`eddyctl user create`), sent as `authorization: Bearer …`.
    #[arg(long, env = "EDDY_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// A TOML file with brokers and credentials (see `eddyctl --help` of `profile`); options
    /// and environment variables override it.
    #[arg(long, env = "EDDY_PROFILE", global = true)]
    pub profile: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,
    /// Deadline of each request, e.g. 10s or 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    pub request_timeout: Duration,
    /// How long an event may be retried (on retriable errors: no leader, a full disk, a quota)
    /// before it fails with the last error, as Kafka's `delivery.timeout.ms`.
    #[arg(long, default_value = "30s", value_parser = parse_duration, global = true)]
    pub delivery_timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 10s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?}; use ms, s or m")),
    }
}

/// `TOPIC/PARTITION`, e.g. `orders/0`.
#[derive(Debug, Clone)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

fn parse_tp(s: &str) -> Result<TopicPartition, String> {
    let (t, p) =
        s.rsplit_once('/').ok_or_else(|| format!("{s:?}: expected TOPIC/PARTITION, e.g. orders/0"))?;
    let partition = p.parse().map_err(|_| format!("{s:?}: {p:?} is not a partition number"))?;
    Ok(TopicPartition { topic: t.to_owned(), partition })
}

fn parse_ids(s: &str) -> Result<Vec<u64>, String> {
    s.split(',').map(|x| x.trim().parse::<u64>().map_err(|_| format!("{x:?} is not a node id"))).collect()
}

fn parse_replica(s: &str) -> Result<ReplicaChoice, String> {
    match s {
        "leader" => Ok(ReplicaChoice::Leader),
        "follower" => Ok(ReplicaChoice::Follower),
        n => n
            .parse()
            .map(ReplicaChoice::Node)
            .map_err(|_| format!("{s:?}: expected leader, follower or a node id")),
    }
}

pub fn parse_time(s: &str) -> Result<i64, String> {
    eddy_ops::offsets::parse_time_ms(s).map_err(|e| e.to_string())
}

fn parse_offset_spec(s: &str) -> Result<OffsetSpec, String> {
    OffsetSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected key=value"))
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The cluster: status, health, leader balance.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Nodes: list, drain, undrain, decommission.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Topics: create, list, describe, delete, change.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Partitions: move, move status, cancel, transfer leadership.
    Partition {
        #[command(subcommand)]
        command: PartitionCommand,
    },
    /// Produce one event per line of stdin; prints {"partition","offset"} per event once acknowledged.
    Produce {
        topic: String,
        /// Partition to write to (default: by key hash, or round-robin without a key).
        #[arg(long)]
        partition: Option<u32>,
        /// Key of every event.
        #[arg(long)]
        key: Option<String>,
        /// A header of every event, KEY=VALUE; repeat for more.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Requests in flight per partition (1 to 5; default 5); when given, the most that were
        /// in flight at once is printed on stderr at the end.
        #[arg(long)]
        max_in_flight_requests: Option<usize>,
        /// How long a batch that is not full waits for more events, in milliseconds.
        #[arg(long, default_value_t = 0)]
        linger_ms: u64,
    },
    /// Print events as JSON lines: of one partition, or, with --group, of the partitions the
    /// group assigns to this member (committing after printing).
    Consume {
        topic: String,
        /// The partition to read (required without --group).
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        partition: Option<u32>,
        /// Consume as a member of this consumer group.
        #[arg(long)]
        group: Option<String>,
        /// With --group: the member's session timeout.
        #[arg(long, default_value_t = 10_000, requires = "group")]
        session_timeout_ms: u32,
        /// With --group: leave the group and exit after this long without a record.
        #[arg(long, requires = "group")]
        idle_exit_ms: Option<u64>,
        /// With --group: cooperative-sticky (incremental), range or round-robin (eager).
        #[arg(long, default_value = "cooperative-sticky", requires = "group")]
        assignor: String,
        /// With --group: where to start a partition the group has not committed: earliest,
        /// latest, or an RFC 3339 time (--from-time sets it too).
        #[arg(long, default_value = "earliest", value_parser = parse_offset_spec, requires = "group")]
        start: OffsetSpec,
        /// First offset to read (default: the start of the log).
        #[arg(long, conflicts_with_all = ["from_time", "group"])]
        from: Option<u64>,
        /// Start at the first event stamped at or after this RFC 3339 time, e.g. 2025-03-01T12:00:00Z
        /// (with --group: in the partitions the group has not committed).
        #[arg(long, value_parser = parse_time, conflicts_with = "start")]
        from_time: Option<i64>,
        /// Stop after this many events (default: follow forever).
        #[arg(long)]
        count: Option<u64>,
        /// Which replica to read from: leader, follower, or a node id.
        #[arg(long, default_value = "follower", value_parser = parse_replica)]
        replica: ReplicaChoice,
        /// Long-poll wait per fetch, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        wait_ms: u32,
    },
    /// Consumer groups: list, describe (with lag), reset offsets, delete.
    Group {
        #[command(subcommand)]
        command: groups::GroupCommand,
    },
    /// Benchmarks with the workload shapes of the NATS JetStream baseline.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Certificates for people without a PKI: a CA, node and client certificates.
    Cert {
        #[command(subcommand)]
        command: security::CertCommand,
    },
    /// Users with tokens: create (prints the token once), delete, list, whoami.
    User {
        #[command(subcommand)]
        command: security::UserCommand,
    },
    /// Per-user byte-rate quotas: set, list.
    Quota {
        #[command(subcommand)]
        command: security::QuotaCommand,
    },
    /// Access control bindings (Kafka's model): add, remove, list.
    Acl {
        #[command(subcommand)]
        command: security::AclCommand,
    },
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Nodes, whether each answers, and the metadata leader.
    Status,
    /// Under-replicated, leaderless and offline partitions, nodes down, metadata quorum.
    /// Exit 0 when healthy, 3 when not.
    Health {
        /// Keep printing the health every second.
        #[arg(long)]
        watch: bool,
        /// Wait until the cluster is healthy (exit 0), or until --timeout (exit 3).
        #[arg(long)]
        exit_when_healthy: bool,
        /// How long --watch or --exit-when-healthy may run.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Move every partition's leadership to its preferred replica.
    Balance {
        /// Wait until every leader is the preferred one (or --timeout).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Nodes with state, address, leaders and replicas.
    List,
    /// Maintenance mode: move the node's leaderships away and give it no new ones.
    Drain { id: u64 },
    /// End maintenance mode.
    Undrain { id: u64 },
    /// Move every replica off the node, then remove it from the cluster.
    Decommission {
        id: u64,
        /// Wait (with a progress bar) until the node holds no replica.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    Create {
        name: String,
        #[arg(long)]
        partitions: u32,
        #[arg(long)]
        replication_factor: u32,
        /// Topic setting as key=value; repeatable.
        #[arg(long = "config", value_parser = parse_kv)]
        config: Vec<(String, String)>,
    },
    List,
    Describe {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Change topic settings.
    AlterConfig {
        name: String,
        /// key=value; repeatable.
        #[arg(long = "set", value_parser = parse_kv, required = true)]
        set: Vec<(String, String)>,
    },
    /// Add partitions to a topic.
    AddPartitions {
        name: String,
        /// How many partitions to add.
        #[arg(long)]
        count: u32,
    },
    /// Each partition's offset at a time (the first event stamped at or after it), or its
    /// earliest or latest offset.
    Offsets {
        name: String,
        /// earliest, latest, or an RFC 3339 time such as 2025-03-01T12:00:00Z.
        #[arg(long, default_value = "latest", value_parser = parse_offset_spec)]
        time: OffsetSpec,
        /// Which replica answers: leader, follower, or a node id.
        #[arg(long, default_value = "leader", value_parser = parse_replica)]
        replica: ReplicaChoice,
    },
}

#[derive(Subcommand, Debug)]
pub enum PartitionCommand {
    /// Reassign a partition's replicas (the first is the preferred leader).
    Move {
        #[arg(value_parser = parse_tp)]
        partition: TopicPartition,
        #[arg(long, value_parser = parse_ids)]
        replicas: std::vec::Vec<u64>,
        /// Wait until the move completes (or --timeout).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Moves in progress.
    MoveStatus,
    /// Cancel a move in progress (the partition returns to its old replicas).
    MoveCancel {
        #[arg(value_parser = parse_tp)]
        partition: TopicPartition,
    },
    /// Make another replica the partition's leader.
    TransferLeadership {
        #[arg(value_parser = parse_tp)]
        partition: TopicPartition,
        #[arg(long)]
        to: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // ring, explicitly: with two providers linked in, rustls would refuse to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDDYCTL_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
    if let Command::Completion { shell } = &cli.command {
        clap_complete::generate(*shell, &mut Cli::command(), "eddyctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if let Command::Cert { command } = cli.command {
        return security::cert(cli.output, command).unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        });
    }
    if let Command::Bench { command: bench::BenchCommand::Probe { dir, syncs, size, round_trips, writers } } =
        &cli.command
    {
        return bench::probe(cli.output, dir.clone(), *syncs, *size, *round_trips, *writers).unwrap_or_else(
            |e| {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            },
        );
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut config = ClientConfig {
        request_timeout: cli.request_timeout,
        delivery_timeout: cli.delivery_timeout,
        ..ClientConfig::default()
    };
    let profile = match &cli.profile {
        Some(p) => security::Profile::load(p)?,
        None => security::Profile::default(),
    };
    let brokers = cli
        .brokers
        .clone()
        .or((!profile.brokers.is_empty()).then_some(profile.brokers))
        .unwrap_or_else(|| vec!["127.0.0.1:9091".to_owned()]);
    let creds = security::Credentials {
        brokers: brokers.clone(),
        ca: cli.ca.clone().or(profile.ca),
        cert: cli.cert.clone().or(profile.cert),
        key: cli.key.clone().or(cli.tls_key.clone()).or(profile.key),
        token: cli.token.clone().or(profile.token),
    };
    creds.apply(&mut config)?;
    let client = Client::connect(&brokers, config).await.context("connect to the cluster")?;
    let format = cli.output;
    match cli.command {
        Command::Cluster { command } => admin::cluster(&client, format, command).await,
        Command::Node { command } => admin::node(&client, format, command).await,
        Command::Topic { command } => admin::topic(&client, format, command).await,
        Command::Partition { command } => admin::partition(&client, format, command).await,
        Command::Produce { topic, partition, key, headers, max_in_flight_requests, linger_ms } => {
            let config = eddy_ops::ProducerConfig {
                max_in_flight: max_in_flight_requests
                    .unwrap_or(eddy_ops::ProducerConfig::default().max_in_flight),
                linger: Duration::from_millis(linger_ms),
            };
            data::produce(client, &topic, partition, key, headers, config, max_in_flight_requests.is_some())
                .await
        }
        Command::Consume {
            topic,
            partition,
            group,
            session_timeout_ms,
            idle_exit_ms,
            assignor,
            start,
            from,
            from_time,
            count,
            replica,
            wait_ms,
        } => match (group, partition) {
            (Some(group), _) => {
                let o = groups::GroupConsume {
                    group,
                    session_timeout_ms,
                    idle_exit_ms,
                    assignor,
                    start: from_time.map_or(start, OffsetSpec::Timestamp),
                    replica,
                    wait_ms,
                    count,
                };
                groups::consume(client, &topic, o).await
            }
            (None, Some(partition)) => {
                let from = match from_time {
                    Some(ts) => Some(data::offset_at(&client, &topic, partition, ts, replica).await?),
                    None => from,
                };
                let follow_log_start = from_time.is_some() || from.is_none();
                data::consume(&client, &topic, partition, from, follow_log_start, count, replica, wait_ms)
                    .await
            }
            (None, None) => unreachable!("clap requires --partition without --group"),
        },
        Command::Group { command } => groups::group(&client, format, command).await,
        Command::Bench { command } => bench::run(client, format, command).await,
        Command::User { command } => security::user(&client, format, command).await,
        Command::Acl { command } => security::acl(&client, format, command).await,
        Command::Quota { command } => security::quota(&client, format, command).await,
        Command::Cert { .. } | Command::Completion { .. } => unreachable!("handled before connecting"),
    }
}

/// Key=value pairs as a map.
pub fn kv_map(v: Vec<(String, String)>) -> BTreeMap<String, String> {
    v.into_iter().collect()
}

/// `--header KEY=VALUE`.
fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}
