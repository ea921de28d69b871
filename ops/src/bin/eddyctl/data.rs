//! `eddyctl produce` and `eddyctl consume`: events from stdin, events to stdout (JSON lines).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use eddy_ops::Client;
use eddy_ops::ClientError;
use eddy_ops::OffsetSpec;
use eddy_ops::Producer;
use eddy_ops::ProducerConfig;
use eddy_ops::ReplicaChoice;
use eddy_ops::output::record_json;
use eddy_proto::v1 as pb;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

/// Records awaiting acknowledgement while `produce` reads stdin.
const PRODUCE_INFLIGHT_MAX: usize = 16_384;

pub async fn produce(
    client: Client,
    topic: &str,
    partition: Option<u32>,
    key: Option<String>,
    headers: Vec<(String, String)>,
    config: ProducerConfig,
    report_in_flight: bool,
) -> anyhow::Result<ExitCode> {
    let headers: Vec<pb::Header> = headers
        .into_iter()
        .map(|(key, value)| pb::Header { key, value: value.into_bytes().into() })
        .collect();
    let producer = Producer::with_config(client, topic, config).await?;
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
            let _ = writeln!(out, "{}", json!({"partition": ack.partition, "offset": ack.offset}));
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
            headers: headers.clone(),
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
    let peak = producer.peak_in_flight();
    producer.close().await;
    if report_in_flight {
        eprintln!("at most {peak} request(s) were in flight per partition at once");
    }
    if failed > 0 {
        eprintln!("error: {failed} of {n} events were not acknowledged");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The first offset of `topic`/`partition` stamped at or after `ts` (for `--from-time`).
pub async fn offset_at(
    client: &Client,
    topic: &str,
    partition: u32,
    ts: i64,
    replica: ReplicaChoice,
) -> anyhow::Result<u64> {
    let r = client
        .list_offsets_on(topic, partition, OffsetSpec::Timestamp(ts), replica)
        .await
        .with_context(|| format!("look up the offset of {topic}/{partition} at time {ts} ms"))?;
    Ok(r.offset)
}

/// Consumes one partition from `from` (the log start when absent). With `follow_log_start`, a
/// position that retention purged before it was read moves to the log start (Kafka's
/// `auto.offset.reset=earliest`): right for a position found by time, whose events retention
/// may delete between the lookup and the first fetch; an explicit `--from OFFSET` fails instead.
#[allow(clippy::too_many_arguments)]
pub async fn consume(
    client: &Client,
    topic: &str,
    partition: u32,
    from: Option<u64>,
    follow_log_start: bool,
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
        let wait = Duration::from_millis(u64::from(wait_ms));
        let resp = match client.fetch(topic, partition, offset, replica, 1 << 20, wait).await {
            // Start wherever the log starts (retention may have moved it).
            Err(ClientError::OffsetOutOfRange { log_start_offset: Some(start), .. })
                if follow_log_start && start > offset =>
            {
                offset = start;
                continue;
            }
            r => r.with_context(|| format!("fetch {topic}/{partition} at offset {offset}"))?,
        };
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
