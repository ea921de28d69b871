//! `eddyctl`: operate an Eddy cluster from the shell.
//!
//! Data goes to stdout, diagnostics to stderr. `--output json` prints one JSON document per
//! command, or one object per line for streams (`produce`, `consume`, which always print JSON
//! lines). Exit codes: 0 success, 1 failure, 2 usage error.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use clap::Parser;
use clap::Subcommand;
use eddy_ops::Client;
use eddy_ops::ClientConfig;
use eddy_ops::Producer;
use eddy_ops::ReplicaChoice;
use eddy_ops::output::Format;
use eddy_ops::output::record_json;
use eddy_ops::output::table;
use eddy_proto::v1 as pb;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

/// Records awaiting acknowledgement while `produce` reads stdin.
const PRODUCE_INFLIGHT_MAX: usize = 16_384;

#[derive(Parser, Debug)]
#[command(name = "eddyctl", version, about = "Operate an Eddy cluster")]
struct Cli {
    /// Broker client addresses, comma-separated.
    #[arg(
        long,
        env = "EDDY_BROKERS",
        default_value = "127.0.0.1:9091",
        value_delimiter = ',',
        global = true
    )]
    brokers: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    /// Deadline of each request, e.g. 10s or 500ms.
    #[arg(long, default_value = "10s", value_parser = humantime_duration, global = true)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?}; use ms, s or m")),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The cluster's nodes and metadata leader.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Create, list and describe topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
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
    },
    /// Print events of a partition as JSON lines.
    Consume {
        topic: String,
        #[arg(long)]
        partition: u32,
        /// First offset to read (default: the start of the log).
        #[arg(long)]
        from: Option<u64>,
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

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Nodes, whether each answers, and the metadata leader.
    Status,
}

#[derive(Subcommand, Debug)]
enum TopicCommand {
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
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected key=value"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDDYCTL_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
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

fn print_json(v: &serde_json::Value) {
    println!("{v}");
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = ClientConfig {
        request_timeout: cli.timeout,
        ..ClientConfig::default()
    };
    let client = Client::connect(&cli.brokers, config)
        .await
        .context("connect to the cluster")?;
    match cli.command {
        Command::Cluster {
            command: ClusterCommand::Status,
        } => cluster_status(&client, cli.output).await,
        Command::Topic { command } => topic(&client, cli.output, command).await,
        Command::Produce {
            topic,
            partition,
            key,
        } => produce(client, &topic, partition, key).await,
        Command::Consume {
            topic,
            partition,
            from,
            count,
            replica,
            wait_ms,
        } => consume(&client, &topic, partition, from, count, replica, wait_ms).await,
    }
}

async fn cluster_status(client: &Client, format: Format) -> anyhow::Result<ExitCode> {
    let md = client.refresh_metadata().await?;
    let probes = md.nodes.values().map(|n| async move {
        let up = matches!(client.node_status(&n.client_addr, Duration::from_secs(2)).await, Ok(s) if s.ready);
        (n.clone(), up)
    });
    let nodes = futures::future::join_all(probes).await;
    match format {
        Format::Json => {
            let nodes: Vec<_> = nodes
                .iter()
                .map(|(n, up)| json!({"id": n.id, "client_addr": n.client_addr, "up": up, "state": n.state}))
                .collect();
            print_json(&json!({"nodes": nodes, "metadata_leader": md.metadata_leader}));
        }
        Format::Table => {
            let rows = nodes
                .iter()
                .map(|(n, up)| {
                    vec![
                        n.id.to_string(),
                        n.client_addr.clone(),
                        if *up { "up" } else { "DOWN" }.to_string(),
                        n.state.clone(),
                        if md.metadata_leader == Some(n.id) {
                            "metadata leader"
                        } else {
                            ""
                        }
                        .to_string(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(&["ID", "CLIENT ADDR", "STATUS", "STATE", "ROLE"], rows)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn topic_json(t: &pb::TopicMetadata) -> serde_json::Value {
    let partitions: Vec<_> = t
        .partitions
        .iter()
        .map(|p| {
            json!({
                "partition": p.partition,
                "leader": p.leader,
                "replicas": p.replicas,
                "high_watermark": p.high_watermark,
                "log_start_offset": p.log_start_offset,
            })
        })
        .collect();
    json!({"name": t.name, "replication_factor": t.replication_factor, "config": t.config, "partitions": partitions})
}

fn print_topic(t: &pb::TopicMetadata, format: Format) {
    match format {
        Format::Json => print_json(&topic_json(t)),
        Format::Table => {
            println!("topic {} (replication factor {})", t.name, t.replication_factor);
            let rows = t
                .partitions
                .iter()
                .map(|p| {
                    vec![
                        p.partition.to_string(),
                        p.leader.map_or("-".into(), |l| l.to_string()),
                        p.replicas
                            .iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        p.high_watermark.to_string(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(&["PARTITION", "LEADER", "REPLICAS", "HIGH WATERMARK"], rows)
            );
        }
    }
}

async fn topic(client: &Client, format: Format, command: TopicCommand) -> anyhow::Result<ExitCode> {
    match command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            config,
        } => {
            let config: BTreeMap<String, String> = config.into_iter().collect();
            let t = client
                .create_topic(&name, partitions, replication_factor, config)
                .await?;
            match format {
                Format::Json => print_json(&topic_json(&t)),
                Format::Table => println!("created topic {} with {} partitions", t.name, t.partitions.len()),
            }
        }
        TopicCommand::List => {
            let topics = client.list_topics().await?;
            match format {
                Format::Json => {
                    let v: Vec<_> = topics
                        .iter()
                        .map(|t| json!({"name": t.name, "partitions": t.partitions, "replication_factor": t.replication_factor}))
                        .collect();
                    print_json(&json!({"topics": v}));
                }
                Format::Table => {
                    let rows = topics
                        .iter()
                        .map(|t| {
                            vec![
                                t.name.clone(),
                                t.partitions.to_string(),
                                t.replication_factor.to_string(),
                            ]
                        })
                        .collect();
                    println!("{}", table(&["NAME", "PARTITIONS", "REPLICATION FACTOR"], rows));
                }
            }
        }
        TopicCommand::Describe { name } => print_topic(&client.describe_topic(&name).await?, format),
    }
    Ok(ExitCode::SUCCESS)
}

async fn produce(
    client: Client,
    topic: &str,
    partition: Option<u32>,
    key: Option<String>,
) -> anyhow::Result<ExitCode> {
    let producer = Producer::new(client, topic).await?;
    if let Some(p) = partition
        && p >= producer.partitions()
    {
        bail!(
            "--partition: topic \"{topic}\" has {} partitions; partition {p} does not exist",
            producer.partitions()
        );
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut pending = FuturesOrdered::new();
    let mut failed = 0u64;
    let mut n = 0u64;
    let stdout = std::io::stdout();
    let mut handle_ack = |i: u64, r: Result<eddy_ops::Ack, eddy_ops::ClientError>| match r {
        Ok(ack) => {
            let mut out = stdout.lock();
            let _ = writeln!(
                out,
                "{}",
                json!({"partition": ack.partition, "offset": ack.offset})
            );
        }
        Err(e) => {
            failed += 1;
            eprintln!("error: event {i}: {e}");
        }
    };
    while let Some(line) = lines.next_line().await.context("read stdin")? {
        n += 1;
        let record = pb::Record {
            key: key.clone().map(|k| k.into_bytes().into()),
            value: line.into_bytes().into(),
            headers: vec![],
            timestamp_ms: None,
        };
        match producer.send(partition, record).await {
            Ok(ack) => pending.push_back(async move { (n, ack.await) }),
            Err(e) => {
                // A record refused before sending (too large): report it in order, then stop.
                while let Some((i, r)) = pending.next().await {
                    handle_ack(i, r);
                }
                eprintln!("error: event {n}: {e}");
                return Ok(ExitCode::FAILURE);
            }
        }
        while pending.len() >= PRODUCE_INFLIGHT_MAX {
            if let Some((i, r)) = pending.next().await {
                handle_ack(i, r);
            }
        }
        // Print what is already acknowledged without waiting.
        while let Some(Some((i, r))) = futures::FutureExt::now_or_never(pending.next()) {
            handle_ack(i, r);
        }
    }
    while let Some((i, r)) = pending.next().await {
        handle_ack(i, r);
    }
    producer.close().await;
    if failed > 0 {
        eprintln!("error: {failed} of {n} events were not acknowledged");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn consume(
    client: &Client,
    topic: &str,
    partition: u32,
    from: Option<u64>,
    count: Option<u64>,
    replica: ReplicaChoice,
    wait_ms: u32,
) -> anyhow::Result<ExitCode> {
    let n = client.partition_count(topic).await?;
    if partition >= n {
        bail!("--partition: topic \"{topic}\" has {n} partitions; partition {partition} does not exist");
    }
    let mut offset = from.unwrap_or(0);
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    while count.is_none_or(|c| printed < c) {
        let resp = client
            .fetch(
                topic,
                partition,
                offset,
                replica,
                1 << 20,
                Duration::from_millis(u64::from(wait_ms)),
            )
            .await
            .with_context(|| format!("fetch {topic}/{partition} at offset {offset}"))?;
        if from.is_none() && offset < resp.log_start_offset {
            offset = resp.log_start_offset;
        }
        let mut out = stdout.lock();
        for r in &resp.records {
            if count.is_some_and(|c| printed >= c) {
                break;
            }
            writeln!(out, "{}", record_json(partition, r)).context("write stdout")?;
            printed += 1;
            offset = r.offset + 1;
        }
        out.flush().context("write stdout")?;
    }
    Ok(ExitCode::SUCCESS)
}
