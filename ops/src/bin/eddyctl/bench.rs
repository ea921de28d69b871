//! `eddyctl bench`: the workload shapes of `../shared/bench/nats` (produce with a window of
//! outstanding events, an open-loop latency run with a consumer on another node, and a consume
//! run from a follower), so Eddy's figures compare side by side with NATS JetStream's.

#![allow(clippy::disallowed_methods)] // Benchmarks measure real time.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use eddy_ops::Client;
use eddy_ops::ClientError;
use eddy_ops::GroupConfig;
use eddy_ops::GroupConsumer;
use eddy_ops::Producer;
use eddy_ops::ProducerConfig;
use eddy_ops::ReplicaChoice;
use eddy_ops::output::Format;
use eddy_proto::v1 as pb;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde_json::Value;
use serde_json::json;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Produce N events of B bytes with at most W unacknowledged (NATS bench "produce").
    Produce {
        #[arg(long)]
        events: u64,
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Events sent and not yet acknowledged, over all partitions.
        #[arg(long, default_value_t = 1)]
        inflight: usize,
        #[arg(long, default_value = "bench")]
        topic: String,
        /// Keep the topic instead of recreating it (PARTITIONS partitions, replication factor
        /// 3).
        #[arg(long)]
        no_reset: bool,
        /// Spread the events round-robin over this many partitions of the topic.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// The producer's requests in flight per partition (1 to 5).
        #[arg(long, default_value_t = eddy_ops::ProducerConfig::default().max_in_flight)]
        max_in_flight_requests: usize,
        /// The producer's linger: how long a batch that is not full waits for more events.
        #[arg(long, default_value_t = 0)]
        linger_ms: u64,
        /// Unmeasured events sent first.
        #[arg(long, default_value_t = 1000)]
        warmup: u64,
        /// Write an SVG latency histogram here.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
    },
    /// Open-loop publishing at R events/s for S seconds, with a consumer on a follower measuring
    /// end-to-end latency (NATS bench "latency").
    Latency {
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[arg(long, default_value = "bench")]
        topic: String,
        #[arg(long, default_value_t = 1)]
        warmup_seconds: u64,
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// The producer's requests in flight per partition (1 to 5).
        #[arg(long, default_value_t = eddy_ops::ProducerConfig::default().max_in_flight)]
        max_in_flight_requests: usize,
        /// The producer's linger: how long a batch that is not full waits for more events.
        #[arg(long, default_value_t = 0)]
        linger_ms: u64,
    },
    /// Write to many partitions of an existing topic at once, one event in flight per
    /// partition, each retried until acknowledged: throughput across partitions, and (with one
    /// event per partition) when each partition accepted writes again after a failure.
    Partitions {
        #[arg(long)]
        topic: String,
        /// Partitions to write to, e.g. `0-999` or `3,7,9`; all of the topic's when absent.
        #[arg(long)]
        partitions: Option<String>,
        /// Events written to each partition, one at a time.
        #[arg(long, default_value_t = 1)]
        events_per_partition: u64,
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Give up on a partition that has not acknowledged by then, e.g. 60s.
        #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
        deadline: Duration,
        /// Write every acknowledged event's offset and value id (`RUN:PARTITION:N`, which
        /// starts its value) here as JSON, for `bench audit --acked`.
        #[arg(long)]
        acked_out: Option<std::path::PathBuf>,
    },
    /// Read every partition of a topic from each of its replicas: offsets must be dense from
    /// the log start, the replicas of a partition must serve the same records, and each event
    /// that `bench partitions --acked-out` recorded as acknowledged must be served by every
    /// replica at its offset (after a failover: nothing acknowledged was lost). Exits 1 and
    /// names each problem otherwise.
    Audit {
        #[arg(long)]
        topic: String,
        /// Files written by `bench partitions --acked-out`.
        #[arg(long)]
        acked: Vec<std::path::PathBuf>,
        /// Replicas read at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Consumer groups committing offsets at a steady pace over an existing topic: each of
    /// GROUPS x MEMBERS members joins, and once the partitions are spread, commits a new offset
    /// for every partition it owns every COMMIT_EVERY for DURATION (what the metadata layer
    /// costs per commit). Members only commit; they read nothing.
    Groups {
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 10)]
        groups: u32,
        /// Members per group.
        #[arg(long, default_value_t = 10)]
        members: u32,
        #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
        commit_every: Duration,
        /// The members' session timeout.
        #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
        session_timeout: Duration,
        /// Groups are named PREFIX-0, PREFIX-1, ...
        #[arg(long, default_value = "bench-groups")]
        group_prefix: String,
    },
    /// The machine's floor for an acknowledgement: appends of SIZE bytes each followed by a
    /// sync (fsync, then fdatasync, which the log uses) in DIR, and 64-byte ping-pongs over one
    /// loopback TCP connection (the probes of `../shared/bench/nats`). Needs no cluster.
    /// `floor_ack_us` is one fsync and two round trips: a leader's sync plus a follower's
    /// request and answer, or the client's and one replication round trip when they overlap.
    /// `floor_ack_shared_us` is the same with the sync of WRITERS concurrent writers: the floor
    /// of a cluster whose replicas share this disk (a local cluster: they sync at once).
    Probe {
        /// Directory on the disk to probe (e.g. a node's data directory); the system's temporary
        /// directory when absent.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Appends synced, per kind of sync.
        #[arg(long, default_value_t = 2000)]
        syncs: u64,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        #[arg(long, default_value_t = 20_000)]
        round_trips: u64,
        /// Writers of the shared probe: that many threads append and `fdatasync` at once, each
        /// in its own file, as the replicas of a cluster on one disk do (`dev` runs three).
        #[arg(long, default_value_t = 3)]
        writers: u64,
    },
    /// Read N events from a follower in batches (NATS bench "consume").
    Consume {
        #[arg(long)]
        events: u64,
        #[arg(long, default_value = "bench")]
        topic: String,
        /// Records per fetch.
        #[arg(long, default_value_t = 1000)]
        batch: u32,
    },
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn hist_json(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_ms": ms(h, 0.5),
        "p99_ms": ms(h, 0.99),
        "p999_ms": ms(h, 0.999),
        "max_ms": h.max() as f64 / 1000.0,
        "mean_ms": h.mean() / 1000.0,
    })
}

fn hist_line(name: &str, h: &Histogram<u64>) -> String {
    format!(
        "{name}: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
        ms(h, 0.5),
        ms(h, 0.99),
        ms(h, 0.999),
        h.max() as f64 / 1000.0,
        h.len()
    )
}

/// A self-contained SVG bar chart of a latency histogram (log-spaced buckets).
fn svg_histogram(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let (w, h) = (900.0, 360.0);
    let mut buckets: Vec<(u64, Vec<u64>)> = Vec::new();
    let mut edge = 1u64;
    let max = series.iter().map(|(_, s)| s.max()).max().unwrap_or(1).max(2);
    while edge <= max * 2 {
        let next = (edge as f64 * 1.25).ceil() as u64;
        let counts =
            series.iter().map(|(_, s)| s.count_between(edge, next.saturating_sub(1).max(edge))).collect();
        buckets.push((edge, counts));
        edge = next;
    }
    let top = buckets.iter().flat_map(|(_, c)| c.iter()).copied().max().unwrap_or(1).max(1) as f64;
    let colors = ["#337ab7", "#d9534f", "#5cb85c"];
    let bw = (w - 80.0) / buckets.len().max(1) as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><text x="10" y="16" font-size="14">{title}</text>"#
    );
    for (i, (edge, counts)) in buckets.iter().enumerate() {
        for (j, c) in counts.iter().enumerate() {
            let bh = (*c as f64 / top) * (h - 80.0);
            let x = 60.0 + i as f64 * bw + j as f64 * bw / counts.len() as f64;
            out.push_str(&format!(
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"><title>{} ms: {c}</title></rect>"#,
                h - 40.0 - bh,
                (bw / counts.len() as f64).max(1.0),
                colors[j % colors.len()],
                *edge as f64 / 1000.0
            ));
        }
        if i % 6 == 0 {
            out.push_str(&format!(
                r#"<text x="{:.1}" y="{}">{:.2}</text>"#,
                60.0 + i as f64 * bw,
                h - 22.0,
                *edge as f64 / 1000.0
            ));
        }
    }
    for (j, (name, _)) in series.iter().enumerate() {
        out.push_str(&format!(
            r#"<rect x="{}" y="26" width="10" height="10" fill="{}"/><text x="{}" y="35">{name}</text>"#,
            w - 260.0 + j as f64 * 120.0,
            colors[j % colors.len()],
            w - 246.0 + j as f64 * 120.0
        ));
    }
    out.push_str(&format!(
        r#"<text x="{}" y="{}">latency (ms, log scale)</text></svg>"#,
        w / 2.0 - 60.0,
        h - 6.0
    ));
    out
}

fn bar(len: u64, format: Format) -> Option<ProgressBar> {
    (format == Format::Table).then(|| ProgressBar::new(len))
}

/// (Re)creates the bench topic: one partition, replication factor 3, and waits for a leader.
/// Recreates the bench topic with `partitions` partitions (when `reset`), then waits until each
/// of its first `partitions` partitions has a leader.
async fn prepare_topic(client: &Client, topic: &str, reset: bool, partitions: u32) -> anyhow::Result<()> {
    if reset {
        match client.delete_topic(topic).await {
            Ok(()) | Err(ClientError::NotFound(_)) => {}
            Err(e) => return Err(e).context("delete the bench topic"),
        }
        // Deletion propagates asynchronously; creation retries until the name is free.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client.create_topic(topic, partitions, 3, BTreeMap::new()).await {
                Ok(_) => break,
                Err(ClientError::AlreadyExists(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e).context("create the bench topic"),
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = client.refresh_metadata().await?;
        if (0..partitions).all(|i| md.partition(topic, i).is_some_and(|p| p.leader.is_some())) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("topic {topic}: not all of partitions 0..{partitions} have a leader after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `n` events with at most `window` unacknowledged; returns their ack latencies.
/// Sends `n` events of `size` bytes round-robin to partitions `0..partitions` with at most
/// `window` unacknowledged; the histogram of their acknowledgement latencies.
async fn produce_window(
    producer: &Producer,
    n: u64,
    size: usize,
    window: usize,
    partitions: u32,
    progress: Option<&ProgressBar>,
) -> anyhow::Result<Histogram<u64>> {
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let mut h = new_hist();
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        while pending.len() >= window.max(1) {
            let (t0, r): (Instant, Result<eddy_ops::Ack, ClientError>) =
                pending.next().await.expect("non-empty");
            r?;
            record(&mut h, t0.elapsed());
            if let Some(b) = progress {
                b.inc(1);
            }
        }
        let t0 = Instant::now();
        let ack = producer
            .send(
                Some((i % u64::from(partitions.max(1))) as u32),
                pb::Record { key: None, value: payload.clone(), headers: vec![], timestamp_ms: None },
            )
            .await?;
        pending.push(async move { (t0, ack.await) });
    }
    while let Some((t0, r)) = pending.next().await {
        r?;
        record(&mut h, t0.elapsed());
        if let Some(b) = progress {
            b.inc(1);
        }
    }
    Ok(h)
}

/// The `bench groups` run; returns its JSON summary.
struct GroupsShape {
    groups: u32,
    members: u32,
    duration: Duration,
    commit_every: Duration,
    session_timeout: Duration,
}

async fn bench_groups(
    client: &Client,
    topic: &str,
    shape: &GroupsShape,
    prefix: &str,
) -> anyhow::Result<Value> {
    use std::cell::Cell;
    let GroupsShape { groups, members, duration, commit_every, session_timeout } = *shape;
    let count = client.partition_count(topic).await?;
    let t_join = Instant::now();
    let joins = (0..groups).flat_map(|g| (0..members).map(move |_| g)).map(|g| {
        let mut config = GroupConfig::new(format!("{prefix}-{g}"), vec![topic.to_owned()]);
        config.session_timeout = session_timeout;
        GroupConsumer::join(client.clone(), config)
    });
    let consumers = futures::future::try_join_all(joins).await.context("join the groups")?;
    let join_s = t_join.elapsed().as_secs_f64();
    let n = consumers.len();
    // Every member heartbeats on its own (taking partitions costs it a lookup per partition, and
    // a member that waited for the others would miss its session timeout) until every group's
    // members own all partitions between them; then all commit from the same start.
    let owned: Vec<Cell<u64>> = (0..n).map(|_| Cell::new(0)).collect();
    let settled: Cell<Option<Instant>> = Cell::new(None);
    let settle_deadline = Instant::now() + Duration::from_secs(300);
    let covered = || {
        (0..groups as usize).all(|g| {
            owned[g * members as usize..(g + 1) * members as usize].iter().map(Cell::get).sum::<u64>()
                == u64::from(count)
        })
    };
    // Member i ticks at start + i/n of the interval, so commits are spread evenly. The offset
    // committed is the tick number, the same for every member at a given time, so a partition
    // that changes owner never sees its offset go back.
    let tasks = consumers.into_iter().enumerate().map(|(i, mut c)| {
        let (owned, settled, covered) = (&owned, &settled, &covered);
        async move {
            let (mut h, mut failures, mut offsets, mut last_error) = (new_hist(), 0u64, 0u64, None);
            let start = loop {
                // A failed heartbeat is retried on the next pass.
                let _ = c.keep_alive().await;
                owned[i].set(c.assignment().len() as u64);
                if settled.get().is_none() && covered() {
                    settled.set(Some(Instant::now()));
                }
                if let Some(at) = settled.get() {
                    break at + Duration::from_millis(500);
                }
                if Instant::now() >= settle_deadline {
                    return (h, failures, offsets, Some("the partitions were not spread in time".to_owned()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let end = start + duration;
            let mut tick = start + commit_every * i as u32 / n as u32;
            let mut round = 0u64;
            while tick < end {
                tokio::time::sleep_until(tokio::time::Instant::from_std(tick)).await;
                round += 1;
                for tp in c.assignment() {
                    c.seek(&tp, round);
                }
                let t0 = Instant::now();
                match c.commit_sync().await {
                    // A member that owns nothing has nothing to commit.
                    Ok(o) if o.is_empty() => {}
                    Ok(o) => {
                        offsets += o.len() as u64;
                        record(&mut h, t0.elapsed());
                    }
                    Err(e) => {
                        failures += 1;
                        last_error = Some(e.to_string());
                    }
                }
                // A failed heartbeat shows as failed commits if the member is fenced.
                let _ = c.keep_alive().await;
                tick += commit_every;
            }
            let _ = c.close().await;
            (h, failures, offsets, last_error)
        }
    });
    let (mut h, mut failures, mut offsets, mut errors) = (new_hist(), 0u64, 0u64, BTreeMap::new());
    for (mh, f, o, e) in futures::future::join_all(tasks).await {
        h.add(&mh).context("merge histograms")?;
        failures += f;
        offsets += o;
        if let Some(e) = e {
            *errors.entry(e).or_insert(0u64) += 1;
        }
    }
    let Some(settled_at) = settled.get() else {
        bail!("the groups did not spread the {count} partitions within 300 s");
    };
    let settle_s = (settled_at - t_join).as_secs_f64() - join_s;
    let secs = duration.as_secs_f64();
    Ok(json!({
        "bench": "groups", "topic": topic, "partitions": count, "groups": groups, "members": groups * members,
        "join_s": join_s, "settle_s": settle_s, "seconds": secs, "commits": h.len(),
        "commit_failures": failures, "errors": errors, "commits_per_sec": h.len() as f64 / secs,
        "offsets_per_sec": offsets as f64 / secs, "commit": hist_json(&h),
    }))
}

/// Parses `0-9,12,15-16` into partition numbers.
fn parse_partitions(spec: &str) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow::anyhow!("--partitions: {part:?} is not a partition number or a range like 0-9");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

/// One partition's writer in `bench partitions`.
struct Writer<'a> {
    client: &'a Client,
    topic: &'a str,
    partition: u32,
    /// This run's id, the first part of each value.
    run: u128,
    size: usize,
}

/// What [`Writer::write`] returns: the partition, its ack latencies, when its first event was
/// acknowledged, why it gave up (if it did), and each acknowledged event's offset and value id.
type Written =
    (u32, Histogram<u64>, Option<(Instant, std::time::SystemTime)>, Option<String>, Vec<(u64, String)>);

impl Writer<'_> {
    /// Writes `events` events one at a time, each retried until acknowledged or `deadline`.
    /// Each value starts with `RUN:PARTITION:N:` and is padded to the size asked.
    async fn write(self, events: u64, deadline: Instant) -> Written {
        let mut h = new_hist();
        let mut first = None;
        let mut written = Vec::new();
        for n in 0..events {
            let id = format!("{}:{}:{n}", self.run, self.partition);
            let mut value = format!("{id}:").into_bytes();
            value.resize(self.size.max(value.len()), b'x');
            let req = pb::ProduceRequest {
                topic: self.topic.to_owned(),
                partition: Some(self.partition),
                records: vec![pb::Record {
                    key: None,
                    value: value.into(),
                    headers: vec![],
                    timestamp_ms: None,
                }],
                producer_id: 0,
                base_sequence: 0,
                timeout_ms: 0,
            };
            let t0 = Instant::now();
            let offset = loop {
                match self.client.produce(req.clone()).await {
                    Ok(r) => break r.base_offset,
                    Err(e) if Instant::now() >= deadline => {
                        return (self.partition, h, first, Some(e.to_string()), written);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            record(&mut h, t0.elapsed());
            first.get_or_insert((Instant::now(), std::time::SystemTime::now()));
            written.push((offset, id));
        }
        (self.partition, h, first, None, written)
    }
}

/// `bench audit`: see [`BenchCommand::Audit`].
async fn audit(
    client: &Client,
    format: Format,
    topic: &str,
    acked_files: &[std::path::PathBuf],
    concurrency: usize,
) -> anyhow::Result<ExitCode> {
    // partition -> offset -> value id, from every file.
    let mut acked: BTreeMap<u32, BTreeMap<u64, String>> = BTreeMap::new();
    for path in acked_files {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let parts =
            v["acked"].as_object().with_context(|| format!("{}: no \"acked\" object", path.display()))?;
        for (p, events) in parts {
            let p: u32 = p.parse().with_context(|| format!("{}: partition {p:?}", path.display()))?;
            for e in events.as_array().into_iter().flatten() {
                let (Some(offset), Some(id)) = (e[0].as_u64(), e[1].as_str()) else {
                    bail!("{}: partition {p}: {e} is not [offset, id]", path.display());
                };
                acked.entry(p).or_default().insert(offset, id.to_owned());
            }
        }
    }
    client.refresh_metadata().await?;
    let count = client.partition_count(topic).await?;
    let mut reads = Vec::new();
    for p in 0..count {
        let meta = client
            .metadata()
            .partition(topic, p)
            .cloned()
            .with_context(|| format!("no metadata for {topic}/{p}"))?;
        reads.extend(meta.replicas.iter().map(|r| (p, *r)));
    }
    let replicas = reads.len();
    let logs: Vec<(u32, u64, anyhow::Result<ReplicaLog>)> = futures::stream::iter(reads)
        .map(|(p, node)| async move { (p, node, read_replica(client, topic, p, node).await) })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut by_partition: BTreeMap<u32, Vec<(u64, ReplicaLog)>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (p, node, log) in logs {
        match log {
            Ok(log) => by_partition.entry(p).or_default().push((node, log)),
            Err(e) => problems.push(format!("{topic}/{p} on node {node}: {e:#}")),
        }
    }
    let (mut records, mut checked) = (0u64, 0u64);
    for (p, logs) in &mut by_partition {
        logs.sort_by_key(|(node, _)| *node);
        for (node, log) in logs.iter() {
            records += log.records.len() as u64;
            if let Some(gap) = log.gap {
                problems.push(format!("{topic}/{p} on node {node}: offsets not dense at {gap}"));
            }
            for (offset, id) in acked.get(p).into_iter().flatten() {
                checked += 1;
                let served =
                    log.records.get(offset.wrapping_sub(log.start) as usize).filter(|_| *offset >= log.start);
                match served {
                    Some(v) if v.starts_with(format!("{id}:").as_bytes()) => {}
                    Some(_) => problems.push(format!("{topic}/{p} on node {node}: offset {offset} holds another event than acknowledged {id}")),
                    None => problems.push(format!(
                        "{topic}/{p} on node {node}: acknowledged {id} at offset {offset} is not served (log {}..{})",
                        log.start, log.high_watermark
                    )),
                }
            }
        }
        // Replicas agree on every offset they both serve.
        for pair in logs.windows(2) {
            let ((na, a), (nb, b)) = (&pair[0], &pair[1]);
            let from = a.start.max(b.start);
            let to = a.high_watermark.min(b.high_watermark);
            if let Some(o) =
                (from..to).find(|o| a.records[(o - a.start) as usize] != b.records[(o - b.start) as usize])
            {
                problems
                    .push(format!("{topic}/{p}: nodes {na} and {nb} serve different records at offset {o}"));
            }
        }
    }
    let v = json!({
        "bench": "audit", "topic": topic, "partitions": count, "replicas": replicas, "records": records,
        "acked_checked": checked, "problems": problems,
    });
    match format {
        Format::Json => println!("{v}"),
        Format::Table => {
            println!(
                "{topic}: {count} partitions, {replicas} replicas read, {records} records, {checked} acknowledged events checked"
            );
            for p in &problems {
                println!("problem: {p}");
            }
        }
    }
    Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// What one replica serves of a partition.
struct ReplicaLog {
    start: u64,
    high_watermark: u64,
    /// The values from `start`, one per offset.
    records: Vec<bytes::Bytes>,
    /// The first offset that was not the one expected, if any.
    gap: Option<u64>,
}

/// Reads a partition from one replica, from its log start up to its high watermark.
async fn read_replica(client: &Client, topic: &str, partition: u32, node: u64) -> anyhow::Result<ReplicaLog> {
    let choice = ReplicaChoice::Node(node);
    let first = match client.fetch(topic, partition, 0, choice, 4 << 20, Duration::ZERO).await {
        Err(ClientError::OffsetOutOfRange { log_start_offset: Some(start), .. }) => {
            client.fetch(topic, partition, start, choice, 4 << 20, Duration::ZERO).await?
        }
        r => r?,
    };
    let start = first.records.first().map_or(first.log_start_offset, |r| r.offset);
    let mut log = ReplicaLog { start, high_watermark: first.high_watermark, records: Vec::new(), gap: None };
    let mut resp = first;
    loop {
        for r in &resp.records {
            let expected = log.start + log.records.len() as u64;
            if r.offset != expected {
                log.gap.get_or_insert(expected);
                return Ok(log);
            }
            log.records.push(r.value.clone());
        }
        let next = log.start + log.records.len() as u64;
        if resp.records.is_empty() || next >= log.high_watermark {
            return Ok(log);
        }
        resp = client.fetch(topic, partition, next, choice, 4 << 20, Duration::ZERO).await?;
        log.high_watermark = log.high_watermark.max(resp.high_watermark);
    }
}

/// Runs `bench probe`, which needs no cluster (so `main` calls it before connecting).
pub fn probe(
    format: Format,
    dir: Option<std::path::PathBuf>,
    syncs: u64,
    size: usize,
    round_trips: u64,
    writers: u64,
) -> anyhow::Result<ExitCode> {
    if syncs == 0 || size == 0 || round_trips == 0 || writers == 0 {
        bail!("--syncs, --size, --round-trips and --writers must be above zero");
    }
    let dir = dir.unwrap_or_else(std::env::temp_dir);
    let fsync = sync_probe(&dir, syncs, size, false, 1)?;
    let fdatasync = sync_probe(&dir, syncs, size, true, 1)?;
    let shared = sync_probe(&dir, syncs, size, true, writers)?;
    let rtt = rtt_probe(round_trips)?;
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q);
    let floor = us(&fsync, 0.5) + 2 * us(&rtt, 0.5);
    let floor_shared = us(&shared, 0.5) + 2 * us(&rtt, 0.5);
    let v = json!({
        "bench": "probe", "dir": dir.display().to_string(), "size": size,
        "fsync_p50_us": us(&fsync, 0.5), "fsync_p99_us": us(&fsync, 0.99),
        "fdatasync_p50_us": us(&fdatasync, 0.5), "fdatasync_p99_us": us(&fdatasync, 0.99),
        "shared_writers": writers,
        "fdatasync_shared_p50_us": us(&shared, 0.5), "fdatasync_shared_p99_us": us(&shared, 0.99),
        "rtt_p50_us": us(&rtt, 0.5), "rtt_p99_us": us(&rtt, 0.99),
        "floor_ack_us": floor,
        "floor_ack_shared_us": floor_shared,
    });
    match format {
        Format::Json => println!("{v}"),
        Format::Table => {
            println!("{}", hist_line(&format!("append {size} B + fsync in {}", dir.display()), &fsync));
            println!(
                "{}",
                hist_line(&format!("append {size} B + fdatasync in {}", dir.display()), &fdatasync)
            );
            println!(
                "{}",
                hist_line(&format!("the same, {writers} writers at once (one file each)"), &shared)
            );
            println!("{}", hist_line("loopback TCP round trip, 64 B", &rtt));
            println!("floor for an acknowledgement (fsync p50 + 2 x round trip p50): {floor} µs");
            println!(
                "the same with {writers} replicas on this disk (shared fdatasync p50 + 2 x round trip p50): \
                 {floor_shared} µs"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Appends `size` bytes and syncs, `count` times, in a new file in `dir` (removed after); with
/// several `writers`, each does so in a file of its own at the same time (`count` split among
/// them), as the replicas of a local cluster do on one disk.
fn sync_probe(
    dir: &std::path::Path,
    count: u64,
    size: usize,
    datasync: bool,
    writers: u64,
) -> anyhow::Result<Histogram<u64>> {
    let each = (count / writers).max(1);
    let start = std::sync::Barrier::new(writers as usize);
    let results: Vec<anyhow::Result<Histogram<u64>>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..writers)
            .map(|i| {
                let path = dir.join(format!(".eddy-sync-probe-{}-{i}", std::process::id()));
                let start = &start;
                scope.spawn(move || sync_writer(&path, each, size, datasync, start))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a sync probe thread panicked"))))
            .collect()
    });
    let mut h = new_hist();
    for r in results {
        h.add(r?).context("merge histograms")?;
    }
    Ok(h)
}

fn sync_writer(
    path: &std::path::Path,
    count: u64,
    size: usize,
    datasync: bool,
    start: &std::sync::Barrier,
) -> anyhow::Result<Histogram<u64>> {
    use std::io::Write;
    let opened = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(path);
    // Every writer passes the barrier, even one that failed, so that the others are not stuck.
    start.wait();
    let mut f = opened.with_context(|| format!("create {}", path.display()))?;
    let buf = vec![0xabu8; size];
    let mut h = new_hist();
    let result = (|| -> std::io::Result<()> {
        for _ in 0..count {
            let t = Instant::now();
            f.write_all(&buf)?;
            if datasync {
                f.sync_data()?
            } else {
                f.sync_all()?
            }
            record(&mut h, t.elapsed());
        }
        Ok(())
    })();
    drop(f);
    let removed = std::fs::remove_file(path);
    result.with_context(|| format!("append and sync {}", path.display()))?;
    removed.with_context(|| format!("remove {}", path.display()))?;
    Ok(h)
}

/// 64-byte ping-pongs over one loopback TCP connection (no Nagle), `count` round trips.
fn rtt_probe(count: u64) -> anyhow::Result<Histogram<u64>> {
    use std::io::Read;
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 64];
        loop {
            match s.read_exact(&mut b) {
                Ok(()) => s.write_all(&b)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut h = new_hist();
    let result = (|| -> std::io::Result<()> {
        let mut c = std::net::TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        let mut b = [7u8; 64];
        for _ in 0..count {
            let t = Instant::now();
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
            record(&mut h, t.elapsed());
        }
        Ok(())
    })();
    // On a failed connect the echo thread still waits in `accept`: not joined, it ends with the
    // process.
    result.context("loopback round trips")?;
    echo.join().map_err(|_| anyhow::anyhow!("the echo thread panicked"))?.context("echo")?;
    Ok(h)
}

pub async fn run(client: Client, format: Format, command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Probe { .. } => unreachable!("`main` runs the probe without a cluster"),
        BenchCommand::Groups {
            topic,
            groups,
            members,
            duration,
            commit_every,
            session_timeout,
            group_prefix,
        } => {
            if commit_every.is_zero() || groups == 0 || members == 0 {
                bail!("--groups, --members and --commit-every must be above zero");
            }
            let shape = GroupsShape { groups, members, duration, commit_every, session_timeout };
            let v = bench_groups(&client, &topic, &shape, &group_prefix).await?;
            match format {
                Format::Json => println!("{v}"),
                Format::Table => {
                    println!(
                        "{} commits ({} failed) of {} members in {:.1} s: {:.0} commits/s, {:.0} offsets/s",
                        v["commits"],
                        v["commit_failures"],
                        v["members"],
                        v["seconds"].as_f64().unwrap_or(0.0),
                        v["commits_per_sec"].as_f64().unwrap_or(0.0),
                        v["offsets_per_sec"].as_f64().unwrap_or(0.0)
                    );
                    println!("commit latency: {}", v["commit"]);
                }
            }
            Ok(if v["commit_failures"].as_u64() == Some(0) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        BenchCommand::Audit { topic, acked, concurrency } => {
            audit(&client, format, &topic, &acked, concurrency).await
        }
        BenchCommand::Partitions { topic, partitions, events_per_partition, size, deadline, acked_out } => {
            let count = client.partition_count(&topic).await?;
            let chosen = match partitions {
                Some(spec) => parse_partitions(&spec)?,
                None => (0..count).collect(),
            };
            if let Some(p) = chosen.iter().find(|p| **p >= count) {
                bail!("--partitions: topic {topic} has {count} partitions, so {p} does not exist");
            }
            // Tells this run's events from any other's.
            let run = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            let t0 = Instant::now();
            let deadline = t0 + deadline;
            let mut writers: FuturesUnordered<_> = chosen
                .iter()
                .map(|p| {
                    let w = Writer { client: &client, topic: &topic, partition: *p, run, size };
                    w.write(events_per_partition, deadline)
                })
                .collect();
            let (mut acks, mut firsts, mut first_unix, mut failed) =
                (new_hist(), new_hist(), BTreeMap::new(), BTreeMap::new());
            let mut acked = BTreeMap::new();
            while let Some((p, h, first, err, written)) = writers.next().await {
                acked.insert(p, written);
                acks.add(&h).context("merge histograms")?;
                if let Some((at, wall)) = first {
                    record(&mut firsts, at - t0);
                    let ms = wall.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                    first_unix.insert(p, ms);
                }
                if let Some(e) = err {
                    failed.insert(p, e);
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            let events = acks.len();
            if let Some(path) = acked_out {
                let text = serde_json::to_string(&json!({ "topic": topic, "acked": acked }))?;
                std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
            }
            let v = json!({
                "bench": "partitions", "topic": topic, "partitions": chosen.len(),
                "events_per_partition": events_per_partition, "events": events, "seconds": secs,
                "events_per_sec": events as f64 / secs, "ack": hist_json(&acks),
                "first_ack": hist_json(&firsts), "first_ack_unix_ms": first_unix, "failed": failed,
            });
            match format {
                Format::Json => println!("{v}"),
                Format::Table => {
                    println!(
                        "{events} events to {} partitions of {topic} in {secs:.2} s: {:.0} events/s",
                        chosen.len(),
                        events as f64 / secs
                    );
                    println!("{}", hist_line("ack latency", &acks));
                    println!("{}", hist_line("first ack per partition, from the start", &firsts));
                    if !failed.is_empty() {
                        println!(
                            "{} partitions never acknowledged: {:?}",
                            failed.len(),
                            failed.keys().collect::<Vec<_>>()
                        );
                    }
                }
            }
            Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        BenchCommand::Produce {
            events,
            size,
            inflight,
            topic,
            no_reset,
            partitions,
            max_in_flight_requests,
            linger_ms,
            warmup,
            plot,
        } => {
            if partitions == 0 {
                bail!("--partitions: at least 1");
            }
            prepare_topic(&client, &topic, !no_reset, partitions).await?;
            let leader = client.metadata().partition(&topic, 0).and_then(|p| p.leader);
            let config = ProducerConfig {
                max_in_flight: max_in_flight_requests,
                linger: Duration::from_millis(linger_ms),
            };
            let producer = Producer::with_config(client.clone(), &topic, config).await?;
            if producer.partitions() < partitions {
                bail!("--partitions {partitions}: topic {topic} has {} partitions", producer.partitions());
            }
            if warmup > 0 {
                produce_window(&producer, warmup, size, inflight.max(16), partitions, None).await?;
            }
            let progress = bar(events, format);
            let t0 = Instant::now();
            let h = produce_window(&producer, events, size, inflight, partitions, progress.as_ref()).await?;
            let secs = t0.elapsed().as_secs_f64();
            if let Some(b) = progress {
                b.finish_and_clear();
            }
            producer.close().await;
            let eps = events as f64 / secs;
            let mbps = eps * size as f64 / 1e6;
            if let Some(path) = plot {
                std::fs::write(
                    &path,
                    svg_histogram(
                        &format!("eddy produce: ack latency, {events} x {size} B, inflight {inflight}"),
                        &[("ack", &h)],
                    ),
                )
                .with_context(|| format!("write {}", path.display()))?;
            }
            let v = json!({
                "bench": "produce", "events": events, "size": size, "inflight": inflight, "leader": leader,
                "partitions": partitions, "max_in_flight_requests": max_in_flight_requests, "linger_ms": linger_ms,
                "seconds": secs, "events_per_sec": eps, "mb_per_sec": mbps, "ack": hist_json(&h),
            });
            match format {
                Format::Json => println!("{v}"),
                Format::Table => {
                    println!(
                        "produce: {events} x {size} B, inflight {inflight}, {partitions} partition(s), \
                         {max_in_flight_requests} requests in flight per partition, leader of partition 0: node {leader:?}"
                    );
                    println!("{eps:.0} events/s, {mbps:.1} MB/s in {secs:.2} s");
                    println!("{}", hist_line("ack latency", &h));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Latency {
            rate,
            seconds,
            size,
            topic,
            warmup_seconds,
            plot,
            max_in_flight_requests,
            linger_ms,
        } => {
            if size < 16 {
                bail!("--size: at least 16 bytes (the payload carries a timestamp)");
            }
            if rate == 0 {
                bail!("--rate: at least 1 event per second");
            }
            prepare_topic(&client, &topic, true, 1).await?;
            let md = client.metadata();
            let leader = md.partition(&topic, 0).and_then(|p| p.leader);
            let follower =
                md.partition(&topic, 0).and_then(|p| p.replicas.iter().copied().find(|r| Some(*r) != leader));
            let config = ProducerConfig {
                max_in_flight: max_in_flight_requests,
                linger: Duration::from_millis(linger_ms),
            };
            let producer = Producer::with_config(client.clone(), &topic, config).await?;
            let base = Instant::now();
            let warm_n = rate * warmup_seconds;
            let total = warm_n + rate * seconds;
            let e2e = Arc::new(Mutex::new(new_hist()));
            // The consumer: a follower (another node than the leader), from the current end.
            let start_offset =
                client.describe_topic(&topic).await?.partitions.first().map_or(0, |p| p.high_watermark);
            let consumer = {
                let (client, topic, e2e) = (client.clone(), topic.clone(), e2e.clone());
                let choice = follower.map_or(ReplicaChoice::Follower, ReplicaChoice::Node);
                tokio::spawn(async move {
                    let mut offset = start_offset;
                    let mut got = 0u64;
                    let deadline = Instant::now() + Duration::from_secs(seconds + warmup_seconds + 30);
                    while got < total && Instant::now() < deadline {
                        let Ok(resp) = client
                            .fetch(&topic, 0, offset, choice, 1 << 20, Duration::from_millis(500))
                            .await
                        else {
                            continue;
                        };
                        let now = base.elapsed().as_nanos() as u64;
                        for r in &resp.records {
                            if r.value.len() >= 16 {
                                let sent = u64::from_le_bytes(r.value[0..8].try_into().expect("8 bytes"));
                                let seq = u64::from_le_bytes(r.value[8..16].try_into().expect("8 bytes"));
                                if seq >= warm_n {
                                    e2e.lock()
                                        .expect("histogram lock")
                                        .saturating_record((now.saturating_sub(sent) / 1000).max(1));
                                }
                            }
                            offset = r.offset + 1;
                            got += 1;
                        }
                    }
                    got
                })
            };
            let mut ack = new_hist();
            let mut pending = FuturesUnordered::new();
            let period = Duration::from_nanos(1_000_000_000 / rate);
            let start = Instant::now() + Duration::from_millis(10);
            let progress = bar(total, format);
            for i in 0..total {
                let due = start + period * (i as u32);
                while Instant::now() < due {
                    tokio::select! {
                        // Both arms only wait; an ack that arrives is recorded, the sleep restarts.
                        () = tokio::time::sleep_until(due.into()) => {}
                        Some((seq, t0, r)) = pending.next(), if !pending.is_empty() => {
                            let r: Result<eddy_ops::Ack, ClientError> = r;
                            r?;
                            if seq >= warm_n { record(&mut ack, Instant::now().duration_since(t0)); }
                            if let Some(b) = &progress { b.inc(1); }
                        }
                    }
                }
                let mut buf = vec![b'x'; size];
                buf[0..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
                buf[8..16].copy_from_slice(&i.to_le_bytes());
                let t0 = Instant::now();
                let fut = producer
                    .send(
                        Some(0),
                        pb::Record { key: None, value: buf.into(), headers: vec![], timestamp_ms: None },
                    )
                    .await?;
                pending.push(async move { (i, t0, fut.await) });
            }
            while let Some((seq, t0, r)) = pending.next().await {
                r?;
                if seq >= warm_n {
                    record(&mut ack, t0.elapsed());
                }
                if let Some(b) = &progress {
                    b.inc(1);
                }
            }
            if let Some(b) = progress {
                b.finish_and_clear();
            }
            producer.close().await;
            let consumed = consumer.await.unwrap_or(0);
            let e2e = e2e.lock().expect("histogram lock").clone();
            if let Some(path) = plot {
                std::fs::write(
                    &path,
                    svg_histogram(
                        &format!("eddy latency: {rate} events/s x {seconds} s, {size} B"),
                        &[("publish→ack", &ack), ("publish→consume", &e2e)],
                    ),
                )
                .with_context(|| format!("write {}", path.display()))?;
            }
            let v = json!({
                "bench": "latency", "rate": rate, "seconds": seconds, "size": size, "leader": leader, "consumer_node": follower,
                "max_in_flight_requests": max_in_flight_requests, "linger_ms": linger_ms,
                "consumed": consumed, "ack": hist_json(&ack), "e2e": hist_json(&e2e),
            });
            match format {
                Format::Json => println!("{v}"),
                Format::Table => {
                    println!(
                        "latency: {rate} events/s for {seconds} s, {size} B, leader node {leader:?}, consumer on node {follower:?}"
                    );
                    println!("{}", hist_line("publish→ack", &ack));
                    println!("{}", hist_line("publish→consume", &e2e));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Consume { events, topic, batch } => {
            let md = client.refresh_metadata().await?;
            let p = md
                .partition(&topic, 0)
                .with_context(|| format!("topic {topic} does not exist; run `bench produce` first"))?;
            let follower = p.replicas.iter().copied().find(|r| Some(*r) != p.leader);
            let choice = follower.map_or(ReplicaChoice::Follower, ReplicaChoice::Node);
            let progress = bar(events, format);
            let t0 = Instant::now();
            let (mut offset, mut got, mut bytes) = (p.log_start_offset, 0u64, 0u64);
            while got < events {
                let resp = fetch_batch(&client, &topic, offset, choice, batch).await?;
                if resp.records.is_empty() {
                    bail!("only {got} of {events} events could be read (the partition ends at {offset})");
                }
                for r in &resp.records {
                    offset = r.offset + 1;
                    bytes += r.value.len() as u64;
                    got += 1;
                }
                if let Some(b) = &progress {
                    b.set_position(got.min(events));
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            if let Some(b) = progress {
                b.finish_and_clear();
            }
            let eps = got as f64 / secs;
            let v = json!({"bench": "consume", "events": got, "batch": batch, "node": follower, "seconds": secs, "events_per_sec": eps, "mb_per_sec": bytes as f64 / secs / 1e6});
            match format {
                Format::Json => println!("{v}"),
                Format::Table => println!(
                    "consume: {got} events from node {follower:?} in {secs:.2} s: {eps:.0} events/s, {:.1} MB/s",
                    bytes as f64 / secs / 1e6
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One fetch of up to `batch` records (no long poll: the data is there).
async fn fetch_batch(
    client: &Client,
    topic: &str,
    offset: u64,
    choice: ReplicaChoice,
    batch: u32,
) -> anyhow::Result<pb::FetchResponse> {
    let resp = client.fetch_records(topic, 0, offset, choice, 8 << 20, batch, Duration::ZERO).await?;
    Ok(resp)
}
