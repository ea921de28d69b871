//! [`Producer`]: an idempotent, batching producer for one topic.
//!
//! Each partition has a worker with at most one request in flight. Records sent while a request
//! is in flight queue up and go out together in the next request, so the batch size adapts to
//! the load: one record per request when idle, thousands under pressure. Each worker has its own
//! producer id and sequence numbers, and retries a failed request with the same sequence, so a
//! retry across a leader failover is never written twice.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;

use eddy_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use crate::client::Backoff;
use crate::client::Client;
use crate::error::ClientError;
use crate::error::Result;

/// Records queued per partition before `send` waits.
const QUEUE_RECORDS_MAX: usize = 65_536;

/// Where a record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: u32,
    pub offset: u64,
}

struct Pending {
    record: pb::Record,
    size: usize,
    tx: oneshot::Sender<Result<Ack>>,
}

pub struct Producer {
    client: Client,
    topic: String,
    n_partitions: u32,
    max_event_bytes: usize,
    workers: Mutex<BTreeMap<u32, mpsc::Sender<Pending>>>,
    round_robin: AtomicU32,
    tasks: TaskTracker,
}

/// The future of one record's acknowledgement.
pub struct AckFuture(oneshot::Receiver<Result<Ack>>);

impl std::future::Future for AckFuture {
    type Output = Result<Ack>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(ClientError::Unavailable("the producer stopped".into()))))
    }
}

fn record_size(r: &pb::Record) -> usize {
    r.key.as_ref().map_or(0, |k| k.len())
        + r.value.len()
        + r.headers.iter().map(|h| h.key.len() + h.value.len()).sum::<usize>()
}

impl Producer {
    /// A producer for `topic`, which must exist.
    pub async fn new(client: Client, topic: &str) -> Result<Self> {
        let n_partitions = client.partition_count(topic).await?;
        let max_event_bytes = client
            .metadata()
            .topics
            .get(topic)
            .and_then(|t| t.config.get("max.event.bytes"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(client.metadata().limits.max_event_bytes) as usize;
        Ok(Self {
            client,
            topic: topic.to_owned(),
            n_partitions,
            max_event_bytes,
            workers: Mutex::new(BTreeMap::new()),
            round_robin: AtomicU32::new(0),
            tasks: TaskTracker::new(),
        })
    }

    pub fn partitions(&self) -> u32 {
        self.n_partitions
    }

    /// Queues `record` for `partition` (or the key's partition, or the next one round-robin),
    /// waiting while the partition's queue is full. The returned future resolves when the
    /// record is acknowledged or has failed for good.
    pub async fn send(&self, partition: Option<u32>, record: pb::Record) -> Result<AckFuture> {
        let partition = match (partition, record.key.as_ref()) {
            (Some(p), _) => p,
            (None, Some(k)) => eddy_proto::partition_for_key(k, self.n_partitions),
            (None, None) => self.round_robin.fetch_add(1, Ordering::Relaxed) % self.n_partitions,
        };
        if partition >= self.n_partitions {
            return Err(ClientError::Invalid(format!(
                "--partition: topic \"{}\" has {} partitions; partition {partition} does not exist",
                self.topic, self.n_partitions
            )));
        }
        let size = record_size(&record);
        if size > self.max_event_bytes {
            return Err(ClientError::Invalid(format!(
                "event of {size} bytes exceeds the maximum event size of {} bytes (max_event_bytes)",
                self.max_event_bytes
            )));
        }
        let tx = self.worker(partition);
        let (ack_tx, ack_rx) = oneshot::channel();
        tx.send(Pending { record, size, tx: ack_tx })
            .await
            .map_err(|_| ClientError::Unavailable("the producer stopped".into()))?;
        Ok(AckFuture(ack_rx))
    }

    fn worker(&self, partition: u32) -> mpsc::Sender<Pending> {
        let mut workers = self.workers.lock().expect("producer lock poisoned");
        workers
            .entry(partition)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE_RECORDS_MAX);
                let w = Worker {
                    client: self.client.clone(),
                    topic: self.topic.clone(),
                    partition,
                    producer_id: None,
                    sequence: 0,
                };
                self.tasks.spawn(w.run(rx));
                tx
            })
            .clone()
    }

    /// Waits until every queued record is acknowledged or failed, then stops the workers.
    pub async fn close(self) {
        self.workers.lock().expect("producer lock poisoned").clear();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

struct Worker {
    client: Client,
    topic: String,
    partition: u32,
    producer_id: Option<u64>,
    sequence: u64,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        while let Some(first) = rx.recv().await {
            let limits = self.client.metadata().limits;
            let max_records = (limits.max_batch_records.max(1)) as usize;
            let max_bytes = (limits.max_request_bytes.max(1)) as usize;
            let mut bytes = first.size;
            let mut batch = vec![first];
            while batch.len() < max_records {
                match rx.try_recv() {
                    Ok(p) if bytes + p.size <= max_bytes => {
                        bytes += p.size;
                        batch.push(p);
                    }
                    Ok(p) => {
                        // Does not fit: it starts the next batch.
                        self.send(batch).await;
                        bytes = p.size;
                        batch = vec![p];
                    }
                    Err(_) => break,
                }
            }
            self.send(batch).await;
        }
    }

    async fn producer_id(&mut self) -> Result<u64> {
        if let Some(id) = self.producer_id {
            return Ok(id);
        }
        let mut backoff = Backoff::new(self.client.config());
        let deadline = tokio::time::Instant::now() + self.client.config().delivery_timeout;
        loop {
            match self.client.init_producer().await {
                Ok(id) => {
                    self.producer_id = Some(id);
                    self.sequence = 0;
                    return Ok(id);
                }
                Err(e) if e.is_retriable() && tokio::time::Instant::now() < deadline => backoff.wait().await,
                Err(e) => return Err(e),
            }
        }
    }

    async fn send(&mut self, batch: Vec<Pending>) {
        let result = self.try_send(&batch).await;
        match result {
            Ok(base_offset) => {
                for (i, p) in batch.into_iter().enumerate() {
                    let _ = p.tx.send(Ok(Ack { partition: self.partition, offset: base_offset + i as u64 }));
                }
            }
            Err(e) => {
                // The sequence can no longer continue where the server expects it: the next
                // batch starts afresh with a new producer id.
                self.producer_id = None;
                for p in batch {
                    let _ = p.tx.send(Err(e.clone()));
                }
            }
        }
    }

    async fn try_send(&mut self, batch: &[Pending]) -> Result<u64> {
        let producer_id = self.producer_id().await?;
        let req = pb::ProduceRequest {
            topic: self.topic.clone(),
            partition: Some(self.partition),
            records: batch.iter().map(|p| p.record.clone()).collect(),
            producer_id,
            base_sequence: self.sequence,
            timeout_ms: 0,
        };
        let resp = self.client.produce(req).await?;
        if resp.count as usize != batch.len() {
            return Err(ClientError::Unavailable(format!(
                "the broker acknowledged {} records of a batch of {}",
                resp.count,
                batch.len()
            )));
        }
        self.sequence += batch.len() as u64;
        Ok(resp.base_offset)
    }
}
