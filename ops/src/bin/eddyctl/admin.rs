//! The operating verbs: cluster, node, topic and partition.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use eddy_ops::Client;
use eddy_ops::output::Format;
use eddy_ops::output::table;
use eddy_proto::v1 as pb;
use indicatif::ProgressBar;
use indicatif::ProgressStyle;
use serde_json::Value;
use serde_json::json;
use tokio::time::Instant;

use crate::ClusterCommand;
use crate::EXIT_UNHEALTHY;
use crate::NodeCommand;
use crate::PartitionCommand;
use crate::TopicCommand;
use crate::kv_map;

/// How often `--wait` and `--watch` poll the cluster.
const POLL: Duration = Duration::from_secs(1);

pub fn print_json(v: &Value) {
    println!("{v}");
}

fn progress(len: u64, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let template = if std::env::var_os("NO_COLOR").is_some() {
        "{msg} [{bar:40}] {pos}/{len} ({elapsed})"
    } else {
        "{msg} [{bar:40.cyan/blue}] {pos}/{len} ({elapsed})"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg.to_owned());
    bar
}

fn ids(v: &[u64]) -> String {
    v.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")
}

// ---------------------------------------------------------------- cluster ---

pub async fn cluster(client: &Client, format: Format, command: ClusterCommand) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::Status => cluster_status(client, format).await,
        ClusterCommand::Health { watch, exit_when_healthy, timeout } => {
            let deadline = timeout.map(|t| Instant::now() + t);
            loop {
                let h = client.cluster_health().await;
                let healthy = h.as_ref().is_ok_and(|h| h.healthy);
                match &h {
                    Ok(h) => print_health(h, format),
                    Err(e) => eprintln!("error: {e}"),
                }
                let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
                if (exit_when_healthy && healthy) || (!watch && !exit_when_healthy) || timed_out {
                    if h.is_err() && !exit_when_healthy && !watch {
                        return Err(h
                            .err()
                            .map(anyhow::Error::from)
                            .unwrap_or_else(|| anyhow::anyhow!("health unknown")));
                    }
                    return Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::from(EXIT_UNHEALTHY) });
                }
                tokio::time::sleep(POLL).await;
            }
        }
        ClusterCommand::Balance { wait, timeout } => {
            let r = client.balance_leaders().await?;
            let deadline = Instant::now() + timeout;
            let mut not_preferred = None;
            if wait {
                loop {
                    let h = client.cluster_health().await?;
                    not_preferred = Some(h.leaders_not_preferred);
                    if h.leaders_not_preferred == 0 || Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(POLL).await;
                    client.balance_leaders().await?;
                }
            }
            match format {
                Format::Json => {
                    print_json(&json!({"transfers": r.transfers, "leaders_not_preferred": not_preferred}))
                }
                Format::Table => match not_preferred {
                    Some(0) => println!("balanced: every partition is led by its preferred replica"),
                    Some(n) => println!("{n} partitions are still not led by their preferred replica"),
                    None => println!("started {} leadership transfers", r.transfers),
                },
            }
            Ok(if not_preferred.is_some_and(|n| n > 0) {
                ExitCode::from(EXIT_UNHEALTHY)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

async fn cluster_status(client: &Client, format: Format) -> anyhow::Result<ExitCode> {
    let md = client.refresh_metadata().await?;
    let probes = md.nodes.values().filter(|n| n.state != "removed").map(|n| async move {
        let status = client.node_status(&n.client_addr, Duration::from_secs(2)).await.ok();
        let up = status.as_ref().is_some_and(|s| s.ready);
        let counts = status.map(|s| (s.replicas, s.quiescent_replicas));
        (n.clone(), up, counts)
    });
    let nodes = futures::future::join_all(probes).await;
    match format {
        Format::Json => {
            let nodes: Vec<_> = nodes
                .iter()
                .map(|(n, up, counts)| {
                    json!({
                        "id": n.id,
                        "client_addr": n.client_addr,
                        "kafka_addr": n.kafka_addr,
                        "rack": n.rack,
                        "up": up,
                        "state": n.state,
                        "replicas": counts.map(|c| c.0),
                        "quiescent_replicas": counts.map(|c| c.1),
                    })
                })
                .collect();
            print_json(&json!({"nodes": nodes, "metadata_leader": md.metadata_leader}));
        }
        Format::Table => {
            let rows = nodes
                .iter()
                .map(|(n, up, _)| {
                    vec![
                        n.id.to_string(),
                        n.client_addr.clone(),
                        n.kafka_addr.clone().unwrap_or_default(),
                        n.rack.clone().unwrap_or_default(),
                        if *up { "up" } else { "DOWN" }.to_string(),
                        n.state.clone(),
                        if md.metadata_leader == Some(n.id) { "metadata leader" } else { "" }.to_string(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(&["ID", "CLIENT ADDR", "KAFKA ADDR", "RACK", "STATUS", "STATE", "ROLE"], rows)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_health(h: &pb::ClusterHealthResponse, format: Format) {
    match format {
        Format::Json => {
            let problems: Vec<_> = h
                .problems
                .iter()
                .map(|p| json!({"topic": p.topic, "partition": p.partition, "problem": p.problem, "replicas": p.replicas, "in_sync": p.in_sync}))
                .collect();
            print_json(&json!({
                "healthy": h.healthy,
                "metadata_quorum": h.metadata_quorum,
                "metadata_leader": h.metadata_leader,
                "nodes_down": h.nodes_down,
                "partitions": h.partitions,
                "problems": problems,
                "leaders_not_preferred": h.leaders_not_preferred,
                "moves_in_progress": h.moves_in_progress,
            }));
        }
        Format::Table => {
            println!(
                "{}: {} partitions, metadata quorum {}, {} nodes down, {} problems, {} leaders not preferred, {} moves in progress",
                if h.healthy { "HEALTHY" } else { "UNHEALTHY" },
                h.partitions,
                if h.metadata_quorum { "ok" } else { "LOST" },
                h.nodes_down.len(),
                h.problems.len(),
                h.leaders_not_preferred,
                h.moves_in_progress
            );
            if !h.nodes_down.is_empty() {
                println!("nodes down: {}", ids(&h.nodes_down));
            }
            if !h.problems.is_empty() {
                let rows = h
                    .problems
                    .iter()
                    .map(|p| {
                        vec![
                            format!("{}/{}", p.topic, p.partition),
                            p.problem.clone(),
                            ids(&p.replicas),
                            ids(&p.in_sync),
                        ]
                    })
                    .collect();
                println!("{}", table(&["PARTITION", "PROBLEM", "REPLICAS", "IN SYNC"], rows));
            }
        }
    }
}

// ------------------------------------------------------------------- node ---

fn node_json(n: &pb::NodeSummary) -> Value {
    json!({
        "id": n.id,
        "state": n.state,
        "client_addr": n.client_addr,
        "kafka_addr": n.kafka_addr,
        "rack": n.rack,
        "leaders": n.leaders,
        "replicas": n.replicas,
        "up": n.up,
        "metadata_voter": n.metadata_voter,
    })
}

pub async fn node(client: &Client, format: Format, command: NodeCommand) -> anyhow::Result<ExitCode> {
    match command {
        NodeCommand::List => {
            let r = client.list_nodes().await?;
            match format {
                Format::Json => print_json(&json!({
                    "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>(),
                    "metadata_leader": r.metadata_leader,
                })),
                Format::Table => {
                    let rows = r
                        .nodes
                        .iter()
                        .map(|n| {
                            vec![
                                n.id.to_string(),
                                n.state.clone(),
                                n.client_addr.clone(),
                                if n.up { "up" } else { "DOWN" }.into(),
                                n.leaders.to_string(),
                                n.replicas.to_string(),
                                if n.metadata_voter { "voter" } else { "learner" }.into(),
                            ]
                        })
                        .collect();
                    println!(
                        "{}",
                        table(
                            &["ID", "STATE", "CLIENT ADDR", "STATUS", "LEADERS", "REPLICAS", "METADATA"],
                            rows
                        )
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Drain { id } => set_state(client, format, id, "draining").await,
        NodeCommand::Undrain { id } => set_state(client, format, id, "active").await,
        NodeCommand::Decommission { id, wait, timeout } => {
            let r = client.set_node_state(id, "decommissioning").await?;
            if !wait {
                match format {
                    Format::Json => {
                        print_json(&json!({"node": r.node.as_ref().map(node_json), "moving": r.moving}))
                    }
                    Format::Table => println!(
                        "decommissioning node {id}: {} partitions will move: {}",
                        r.moving.len(),
                        r.moving.join(", ")
                    ),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let total = r.node.as_ref().map_or(0, |n| n.replicas) as u64;
            let bar =
                (format == Format::Table).then(|| progress(total, &format!("decommissioning node {id}")));
            let deadline = Instant::now() + timeout;
            let last = loop {
                let nodes = client.list_nodes().await?;
                let n = nodes.nodes.into_iter().find(|n| n.id == id);
                let remaining = n.as_ref().map_or(0, |n| n.replicas) as u64;
                if let Some(b) = &bar {
                    b.set_position(total.saturating_sub(remaining));
                }
                let done =
                    n.as_ref().is_none_or(|n| n.state == "removed" || (n.replicas == 0 && n.leaders == 0));
                if done || Instant::now() >= deadline {
                    break n;
                }
                tokio::time::sleep(POLL).await;
            };
            if let Some(b) = bar {
                b.finish();
            }
            let done = last.as_ref().is_none_or(|n| n.replicas == 0);
            match format {
                Format::Json => print_json(&json!({"node": last.as_ref().map(node_json), "done": done})),
                Format::Table => match &last {
                    Some(n) if done => println!("node {id} holds no replica; state {}", n.state),
                    Some(n) => println!(
                        "node {id} still holds {} replicas after {timeout:?}; the decommission continues",
                        n.replicas
                    ),
                    None => println!("node {id} is gone from the cluster"),
                },
            }
            Ok(if done { ExitCode::SUCCESS } else { ExitCode::from(EXIT_UNHEALTHY) })
        }
    }
}

async fn set_state(client: &Client, format: Format, id: u64, state: &str) -> anyhow::Result<ExitCode> {
    let r = client.set_node_state(id, state).await?;
    match format {
        Format::Json => print_json(&json!({"node": r.node.as_ref().map(node_json)})),
        Format::Table => println!("node {id} is now {state}"),
    }
    Ok(ExitCode::SUCCESS)
}

// ------------------------------------------------------------------ topic ---

fn topic_json(t: &pb::TopicMetadata) -> Value {
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
                "term": p.term,
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
            if !t.config.is_empty() {
                let cfg: Vec<String> = t.config.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("config: {}", cfg.join(", "));
            }
            let rows = t
                .partitions
                .iter()
                .map(|p| {
                    vec![
                        p.partition.to_string(),
                        p.leader.map_or("-".into(), |l| l.to_string()),
                        ids(&p.replicas),
                        p.log_start_offset.to_string(),
                        p.high_watermark.to_string(),
                    ]
                })
                .collect();
            println!("{}", table(&["PARTITION", "LEADER", "REPLICAS", "LOG START", "HIGH WATERMARK"], rows));
        }
    }
}

pub async fn topic(client: &Client, format: Format, command: TopicCommand) -> anyhow::Result<ExitCode> {
    match command {
        TopicCommand::Create { name, partitions, replication_factor, config } => {
            let t = client.create_topic(&name, partitions, replication_factor, kv_map(config)).await?;
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
                            vec![t.name.clone(), t.partitions.to_string(), t.replication_factor.to_string()]
                        })
                        .collect();
                    println!("{}", table(&["NAME", "PARTITIONS", "REPLICATION FACTOR"], rows));
                }
            }
        }
        TopicCommand::Describe { name } => print_topic(&client.describe_topic(&name).await?, format),
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            match format {
                Format::Json => print_json(&json!({"deleted": name})),
                Format::Table => println!("deleted topic {name}"),
            }
        }
        TopicCommand::AlterConfig { name, set } => {
            let r = client.alter_topic_config(&name, kv_map(set)).await?;
            match format {
                Format::Json => print_json(&json!({"name": name, "config": r.config})),
                Format::Table => {
                    let cfg: Vec<String> = r.config.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("topic {name}: {}", cfg.join(", "));
                }
            }
        }
        TopicCommand::Offsets { name, time, replica } => {
            offsets(client, format, &name, time, replica).await?
        }
        TopicCommand::AddPartitions { name, count } => {
            let r = client.add_partitions(&name, count).await?;
            match format {
                Format::Json => print_json(&json!({"name": name, "partitions": r.partitions})),
                Format::Table => println!("topic {name} now has {} partitions", r.partitions),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `topic offsets`: one lookup per partition.
async fn offsets(
    client: &Client,
    format: Format,
    name: &str,
    spec: eddy_ops::OffsetSpec,
    replica: eddy_ops::ReplicaChoice,
) -> anyhow::Result<()> {
    let n = client.partition_count(name).await?;
    let mut found = Vec::new();
    for p in 0..n {
        found.push((p, client.list_offsets_on(name, p, spec, replica).await?));
    }
    match format {
        Format::Json => {
            let partitions: Vec<_> = found
                .iter()
                .map(|(p, r)| json!({"partition": p, "offset": r.offset, "timestamp_ms": r.timestamp_ms}))
                .collect();
            print_json(&json!({"partitions": partitions}));
        }
        Format::Table => {
            let rows = found
                .iter()
                .map(|(p, r)| {
                    vec![
                        p.to_string(),
                        r.offset.to_string(),
                        r.timestamp_ms.map_or("-".into(), |t| t.to_string()),
                    ]
                })
                .collect();
            println!("{}", table(&["PARTITION", "OFFSET", "TIMESTAMP MS"], rows));
        }
    }
    Ok(())
}

// -------------------------------------------------------------- partition ---

fn move_json(m: &pb::MoveStatus) -> Value {
    json!({"topic": m.topic, "partition": m.partition, "from": m.from, "to": m.to, "voters": m.voters, "learners": m.learners})
}

pub async fn partition(
    client: &Client,
    format: Format,
    command: PartitionCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        PartitionCommand::Move { partition: tp, replicas, wait, timeout } => {
            client.move_partition(&tp.topic, tp.partition, replicas.clone()).await?;
            if !wait {
                match format {
                    Format::Json => print_json(
                        &json!({"topic": tp.topic, "partition": tp.partition, "to": replicas, "done": false}),
                    ),
                    Format::Table => println!("moving {}/{} to {}", tp.topic, tp.partition, ids(&replicas)),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let bar = (format == Format::Table).then(|| {
                let b = ProgressBar::new_spinner();
                b.set_message(format!("moving {}/{} to {}", tp.topic, tp.partition, ids(&replicas)));
                b
            });
            let deadline = Instant::now() + timeout;
            let done = loop {
                let moves = client.list_moves().await?;
                let m = moves.moves.iter().find(|m| m.topic == tp.topic && m.partition == tp.partition);
                match (m, &bar) {
                    (None, _) => break true,
                    (Some(m), Some(b)) => {
                        b.set_message(format!(
                            "moving {}/{} to {}: voters {}, learners {}",
                            tp.topic,
                            tp.partition,
                            ids(&replicas),
                            ids(&m.voters),
                            ids(&m.learners)
                        ));
                        b.tick();
                    }
                    _ => {}
                }
                if Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(POLL).await;
            };
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            match format {
                Format::Json => print_json(
                    &json!({"topic": tp.topic, "partition": tp.partition, "to": replicas, "done": done}),
                ),
                Format::Table if done => {
                    println!("moved {}/{} to {}", tp.topic, tp.partition, ids(&replicas))
                }
                Format::Table => println!(
                    "the move of {}/{} did not finish within {timeout:?}; it continues",
                    tp.topic, tp.partition
                ),
            }
            Ok(if done { ExitCode::SUCCESS } else { ExitCode::from(EXIT_UNHEALTHY) })
        }
        PartitionCommand::MoveStatus => {
            let r = client.list_moves().await?;
            match format {
                Format::Json => {
                    print_json(&json!({"moves": r.moves.iter().map(move_json).collect::<Vec<_>>()}))
                }
                Format::Table if r.moves.is_empty() => println!("no moves in progress"),
                Format::Table => {
                    let rows = r
                        .moves
                        .iter()
                        .map(|m| {
                            vec![
                                format!("{}/{}", m.topic, m.partition),
                                ids(&m.from),
                                ids(&m.to),
                                ids(&m.voters),
                                ids(&m.learners),
                            ]
                        })
                        .collect();
                    println!("{}", table(&["PARTITION", "FROM", "TO", "VOTERS", "LEARNERS"], rows));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PartitionCommand::MoveCancel { partition: tp } => {
            client.cancel_move(&tp.topic, tp.partition).await?;
            match format {
                Format::Json => {
                    print_json(&json!({"topic": tp.topic, "partition": tp.partition, "cancelled": true}))
                }
                Format::Table => println!("cancelled the move of {}/{}", tp.topic, tp.partition),
            }
            Ok(ExitCode::SUCCESS)
        }
        PartitionCommand::TransferLeadership { partition: tp, to } => {
            let leader = client.transfer_leadership(&tp.topic, tp.partition, to).await?;
            if leader != to {
                bail!("{}/{} is led by node {leader}, not {to}", tp.topic, tp.partition);
            }
            match format {
                Format::Json => {
                    print_json(&json!({"topic": tp.topic, "partition": tp.partition, "leader": leader}))
                }
                Format::Table => println!("{}/{} is now led by node {leader}", tp.topic, tp.partition),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
