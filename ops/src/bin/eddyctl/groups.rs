//! `eddyctl consume --group` and the `group` verbs.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use clap::Subcommand;
use eddy_ops::Client;
use eddy_ops::GroupConfig;
use eddy_ops::GroupConsumer;
use eddy_ops::OffsetSpec;
use eddy_ops::ReplicaChoice;
use eddy_ops::output::Format;
use eddy_ops::output::record_json;
use eddy_ops::output::table;
use eddy_proto::v1 as pb;
use serde_json::Value;
use serde_json::json;
use tokio::time::Instant;

use crate::parse_time;

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Consumer groups with their member count and state.
    List,
    /// Members with their partitions, and per partition the committed offset, high watermark and lag.
    Describe { group: String },
    /// Move a group's committed offsets (only while the group has no members).
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        /// The first offset of each partition.
        #[arg(long, group = "to")]
        to_earliest: bool,
        /// The high watermark of each partition (skip everything).
        #[arg(long, group = "to")]
        to_latest: bool,
        /// The same offset in every partition (clamped to the partition's range).
        #[arg(long, group = "to")]
        to_offset: Option<u64>,
        /// Move each committed offset by N (negative: back), within the partition's range.
        #[arg(long, group = "to", allow_hyphen_values = true)]
        shift_by: Option<i64>,
        /// The first event stamped at or after this RFC 3339 time, per partition.
        #[arg(long, group = "to", value_parser = parse_time)]
        to_datetime: Option<i64>,
        /// Print the plan without changing anything.
        #[arg(long, group = "mode")]
        dry_run: bool,
        /// Apply the plan.
        #[arg(long, group = "mode")]
        execute: bool,
    },
    /// Delete a group with no members, and its committed offsets.
    Delete { group: String },
}

/// Options of `consume --group`.
pub struct GroupConsume {
    pub group: String,
    pub session_timeout_ms: u32,
    pub idle_exit_ms: Option<u64>,
    pub assignor: String,
    pub start: OffsetSpec,
    pub replica: ReplicaChoice,
    pub wait_ms: u32,
    pub count: Option<u64>,
}

/// Runs as a member of the group: prints the records of the partitions assigned to it as JSON
/// lines, commits after printing each batch, and leaves the group when idle for `idle_exit_ms`,
/// after `count` records, or on Ctrl-C.
pub async fn consume(client: Client, topic: &str, o: GroupConsume) -> anyhow::Result<ExitCode> {
    client.partition_count(topic).await?;
    let mut config = GroupConfig::new(o.group.clone(), vec![topic.to_owned()]);
    config.session_timeout = Duration::from_millis(o.session_timeout_ms.into());
    config.assignor = o.assignor;
    config.start = o.start;
    config.replica = o.replica;
    config.max_wait = Duration::from_millis(o.wait_ms.into());
    let mut consumer = GroupConsumer::join(client, config).await.context("join the group")?;
    let mut last_record = Instant::now();
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let batch = tokio::select! {
            r = consumer.poll() => r.context("poll")?,
            _ = &mut ctrl_c => break,
        };
        if !batch.is_empty() {
            let mut out = stdout.lock();
            for d in &batch {
                let mut v = record_json(d.partition, &d.record);
                v["topic"] = Value::String(d.topic.clone());
                writeln!(out, "{v}").context("write stdout")?;
            }
            out.flush().context("write stdout")?;
            drop(out);
            printed += batch.len() as u64;
            last_record = Instant::now();
            if let Err(e) = consumer.commit_sync().await {
                eprintln!("warning: commit failed (the records may be delivered again): {e}");
            }
        }
        if o.count.is_some_and(|c| printed >= c) {
            break;
        }
        if o.idle_exit_ms.is_some_and(|ms| last_record.elapsed() >= Duration::from_millis(ms)) {
            break;
        }
    }
    consumer.close().await.context("leave the group")?;
    Ok(ExitCode::SUCCESS)
}

fn member_json(m: &pb::GroupMember) -> Value {
    json!({
        "id": m.id,
        "partitions": m.partitions.iter().map(|p| json!({"topic": p.topic, "partition": p.partition})).collect::<Vec<_>>(),
        "topics": m.topics,
        "session_timeout_ms": m.session_timeout_ms,
    })
}

fn partition_json(p: &pb::GroupPartition) -> Value {
    json!({
        "topic": p.topic,
        "partition": p.partition,
        "committed": p.committed,
        "high_watermark": p.high_watermark,
        "log_start_offset": p.log_start_offset,
        "lag": p.lag,
    })
}

pub async fn group(client: &Client, format: Format, command: GroupCommand) -> anyhow::Result<ExitCode> {
    match command {
        GroupCommand::List => {
            let groups = client.list_groups().await?;
            match format {
                Format::Json => {
                    let v: Vec<Value> = groups
                        .iter()
                        .map(|g| json!({"name": g.name, "members": g.members, "state": g.state, "assignor": g.assignor, "generation": g.generation}))
                        .collect();
                    println!("{}", json!({"groups": v}));
                }
                Format::Table => {
                    let rows = groups
                        .iter()
                        .map(|g| {
                            vec![
                                g.name.clone(),
                                g.members.to_string(),
                                g.state.clone(),
                                g.assignor.clone(),
                                g.generation.to_string(),
                            ]
                        })
                        .collect();
                    println!("{}", table(&["GROUP", "MEMBERS", "STATE", "ASSIGNOR", "GENERATION"], rows));
                }
            }
        }
        GroupCommand::Describe { group } => {
            let d = client.describe_group(&group).await?;
            match format {
                Format::Json => println!(
                    "{}",
                    json!({
                        "group": d.group,
                        "state": d.state,
                        "assignor": d.assignor,
                        "generation": d.generation,
                        "members": d.members.iter().map(member_json).collect::<Vec<_>>(),
                        "partitions": d.partitions.iter().map(partition_json).collect::<Vec<_>>(),
                    })
                ),
                Format::Table => {
                    println!("group {} ({}, {}, generation {})", d.group, d.state, d.assignor, d.generation);
                    let owner = |t: &str, p: u32| {
                        d.members
                            .iter()
                            .find(|m| m.partitions.iter().any(|x| x.topic == t && x.partition == p))
                            .map_or("-".to_owned(), |m| m.id.clone())
                    };
                    let rows = d
                        .partitions
                        .iter()
                        .map(|p| {
                            vec![
                                format!("{}/{}", p.topic, p.partition),
                                p.committed.map_or("-".into(), |c| c.to_string()),
                                p.high_watermark.to_string(),
                                p.lag.to_string(),
                                owner(&p.topic, p.partition),
                            ]
                        })
                        .collect();
                    println!(
                        "{}",
                        table(&["PARTITION", "COMMITTED", "HIGH WATERMARK", "LAG", "MEMBER"], rows)
                    );
                }
            }
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to_earliest,
            to_latest,
            to_offset,
            shift_by,
            to_datetime,
            dry_run,
            execute,
        } => {
            if !(dry_run || execute) {
                bail!("give --dry-run to see the plan, or --execute to apply it");
            }
            if !(to_earliest
                || to_latest
                || to_offset.is_some()
                || shift_by.is_some()
                || to_datetime.is_some())
            {
                bail!("give one of --to-earliest, --to-latest, --to-offset N, --shift-by N, --to-datetime T");
            }
            let t = client.describe_topic(&topic).await?;
            let current = match client.describe_group(&group).await {
                Ok(d) => {
                    if !d.members.is_empty() {
                        bail!(
                            "group \"{group}\" has {} active members; offsets can only be reset while the group is empty",
                            d.members.len()
                        );
                    }
                    d.partitions
                }
                Err(e) if e.code() == Some(eddy_proto::error_codes::UNKNOWN_GROUP) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let mut at_time = std::collections::BTreeMap::new();
            if let Some(ts) = to_datetime {
                for p in &t.partitions {
                    let r = client
                        .list_offsets(&topic, p.partition, OffsetSpec::Timestamp(ts))
                        .await
                        .with_context(|| format!("look up {topic}/{} at time {ts} ms", p.partition))?;
                    at_time.insert(p.partition, r.offset);
                }
            }
            let plan: Vec<((String, u32), Option<u64>, u64)> = t
                .partitions
                .iter()
                .map(|p| {
                    let (lo, hi) = (p.log_start_offset, p.high_watermark);
                    let committed = current
                        .iter()
                        .find(|c| c.topic == topic && c.partition == p.partition)
                        .and_then(|c| c.committed);
                    let to = if to_earliest {
                        lo
                    } else if to_latest {
                        hi
                    } else if let Some(o) = to_offset {
                        o.clamp(lo, hi)
                    } else if let Some(o) = at_time.get(&p.partition) {
                        (*o).clamp(lo, hi)
                    } else {
                        let base = committed.unwrap_or(lo) as i64;
                        (base.saturating_add(shift_by.unwrap_or(0))).clamp(lo as i64, hi as i64) as u64
                    };
                    ((topic.clone(), p.partition), committed, to)
                })
                .collect();
            if execute {
                let offsets: Vec<((String, u32), u64)> =
                    plan.iter().map(|(tp, _, to)| (tp.clone(), *to)).collect();
                client.reset_offsets(&group, &offsets).await?;
            }
            match format {
                Format::Json => {
                    let v: Vec<Value> = plan
                        .iter()
                        .map(|((t, p), from, to)| json!({"topic": t, "partition": p, "committed": from, "new_offset": to}))
                        .collect();
                    println!("{}", json!({"group": group, "executed": execute, "partitions": v}));
                }
                Format::Table => {
                    let rows = plan
                        .iter()
                        .map(|((t, p), from, to)| {
                            vec![
                                format!("{t}/{p}"),
                                from.map_or("-".into(), |c| c.to_string()),
                                to.to_string(),
                            ]
                        })
                        .collect();
                    println!("{}", table(&["PARTITION", "COMMITTED", "NEW OFFSET"], rows));
                    if dry_run {
                        println!("dry run: nothing changed; run again with --execute to apply");
                    }
                }
            }
        }
        GroupCommand::Delete { group } => {
            client.delete_group(&group).await?;
            match format {
                Format::Json => println!("{}", json!({"deleted": group})),
                Format::Table => println!("deleted group {group}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
