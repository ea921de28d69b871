//! Producing, fetching and offset lookups: the data plane every protocol shares.

use std::time::Duration;

use bytes::Bytes;

use super::BrokerState;
use super::META_WRITE_TIMEOUT;
use super::partition_index;
use eddy_raft::NodeId;

use crate::error::BrokerError;
use crate::limits;
use crate::meta::MetaCommand;
use crate::meta::MetaReply;
use crate::meta::state::TopicRecord;
use crate::partition::command::ProduceBatch;
use crate::partition::command::StoredRecord;
use crate::partition::handle::Fetched;
use crate::partition::handle::ListedOffset;
use crate::partition::handle::OffsetSpec;
use crate::partition::handle::Produced;

/// A record as a client hands it over; the leader stamps it (see [`record_timestamp`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
    pub timestamp_ms: Option<i64>,
}

/// A batch of records for one partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produce {
    pub topic: String,
    /// `None`: the partition of the first record's key (`eddy_proto::partition_for_key`), or
    /// partition 0 for a record without one.
    pub partition: Option<u32>,
    pub records: Vec<NewRecord>,
    /// 0 for a producer without idempotence.
    pub producer_id: u64,
    pub base_sequence: u64,
    /// How long the leader waits for the commit; 0 means the default.
    pub timeout_ms: u32,
}

/// Where a produced batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceOutcome {
    pub partition: u32,
    pub produced: Produced,
}

/// A read of one partition from `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    /// 0 means 1 MiB; capped by the node's `max_fetch_bytes`.
    pub max_bytes: u32,
    /// 0 means no limit but the bytes.
    pub max_records: u32,
    /// How long to wait for records past `offset` (capped at `limits::FETCH_WAIT_MS_MAX`).
    pub max_wait_ms: u32,
}

/// A record's timestamp: the producer's, unless it gave none or the topic says
/// `timestamp.type=log-append`; then the leader's clock.
pub fn record_timestamp(producer_ms: Option<i64>, now_ms: i64, log_append_time: bool) -> i64 {
    match producer_ms {
        Some(ts) if !log_append_time => ts,
        _ => now_ms,
    }
}

impl BrokerState {
    /// Appends a batch on the partition's leader (this node) and waits until a quorum has it.
    pub async fn produce(&self, req: Produce) -> Result<ProduceOutcome, BrokerError> {
        let topic = self.topic(&req.topic)?;
        let n = topic.partitions.len() as u32;
        let partition = match req.partition {
            Some(p) => p,
            None => match req.records.first().and_then(|r| r.key.as_ref()) {
                Some(k) => eddy_proto::partition_for_key(k, n),
                None => 0,
            },
        };
        let pi = partition_index(&topic, partition)?;
        let records = self.to_stored(&topic, req.records)?;
        let group = topic.partitions[pi].group_id;
        let Some(h) = self.replicas.get(group) else {
            return Err(BrokerError::NotLeader {
                what: format!("{}/{partition}", topic.name),
                me: self.me,
                leader: None,
                leader_addr: None,
            });
        };
        let timeout_ms = match req.timeout_ms {
            0 => limits::PRODUCE_TIMEOUT_MS_DEFAULT,
            t => t.min(limits::PRODUCE_TIMEOUT_MS_MAX),
        };
        // A full disk refuses the write where it would be appended: on the leader. (Elsewhere
        // the request gets `not_leader` from the replica, which names the leader.)
        // The flag first: the produce path reads no metrics while the disk has room.
        if self.disk.is_full() && h.status().is_leader {
            self.disk.check_writable()?;
        }
        let batch = ProduceBatch { producer_id: req.producer_id, base_sequence: req.base_sequence, records };
        let produced = h.produce(batch, Duration::from_millis(u64::from(timeout_ms))).await?;
        self.metrics.produce_records.inc_by(u64::from(produced.count));
        Ok(ProduceOutcome { partition, produced })
    }

    /// Reads committed records from this node's replica (leader or follower), waiting up to
    /// `max_wait_ms` for some past `offset`.
    pub async fn fetch(&self, req: Fetch) -> Result<Fetched, BrokerError> {
        let topic = self.topic(&req.topic)?;
        let h = self.replica(&topic, req.partition)?;
        // A follower serves reads only while this node's metadata is confirmed current (within
        // `SERVE_STALE_MAX`): a replica on a node the cluster removed, or one moved away while
        // its node was down, holds a committed prefix that never grows again, and a consumer
        // reading it would wait for good (simulator seed 107, the `linger` class). The client
        // moves on to another replica. A leader serves regardless: reads must not need the
        // metadata group. A follower the confirmed placement no longer lists (moved away, or
        // on a node being removed) is about to stop, and its prefix never grows again: it
        // refuses too, naming the replicas that do serve.
        if h.status().leader != Some(self.me) {
            let view = self.meta.serving_view().await?;
            let placed =
                view.state.topics.get(&req.topic).and_then(|t| t.partitions.get(req.partition as usize));
            // The same group: a topic deleted and created again under its name has new groups.
            if !placed.is_some_and(|p| p.group_id == h.group() && p.is_holder(self.me)) {
                return Err(BrokerError::NotReplica {
                    what: format!("{}/{}", req.topic, req.partition),
                    me: self.me,
                    replicas: placed.map(|p| p.replicas.clone()).unwrap_or_default(),
                });
            }
        }
        let max_bytes = match req.max_bytes {
            0 => 1 << 20,
            b => b.min(self.limits.max_fetch_bytes),
        } as usize;
        let max_records = match req.max_records {
            0 => usize::MAX,
            r => r as usize,
        };
        let wait = Duration::from_millis(u64::from(req.max_wait_ms.min(limits::FETCH_WAIT_MS_MAX)));
        let f = h.fetch(req.offset, max_bytes, max_records, wait).await?;
        self.metrics.fetch_records.inc_by(f.records.len() as u64);
        Ok(f)
    }

    /// Whether `offset` is past the end of this node's replica of a partition for certain (see
    /// [`crate::partition::handle::PartitionHandle::past_end`]).
    pub fn past_end(&self, topic: &str, partition: u32, offset: u64) -> bool {
        self.topic(topic).and_then(|t| self.replica(&t, partition)).is_ok_and(|h| h.past_end(offset))
    }

    /// The earliest or latest offset of a partition, or the first at or after a timestamp, from
    /// this node's replica.
    pub fn list_offset(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<ListedOffset, BrokerError> {
        let topic = self.topic(topic)?;
        self.replica(&topic, partition)?.list_offset(spec)
    }

    /// A replica in `rack` to serve a consumer of a partition instead of this node (KIP-392's
    /// preferred read replica): chosen only by the leader, only among replicas in sync and
    /// alive that have a Kafka listener; `None` when this node is in that rack, or none is.
    pub fn read_replica_in_rack(&self, topic: &str, partition: u32, rack: &str) -> Option<NodeId> {
        use openraft::async_runtime::WatchReceiver;
        let (_, p) = self.partition(topic, partition).ok()?;
        let h = self.replicas.get(p.group_id)?;
        let view = self.meta.view();
        let in_rack = |n: NodeId| {
            view.state
                .nodes
                .get(&n)
                .is_some_and(|r| r.rack.as_deref() == Some(rack) && r.kafka_addr.is_some())
        };
        if in_rack(self.me) {
            return None;
        }
        let metrics = h.raft().metrics();
        let m = metrics.borrow_watched();
        if m.current_leader != Some(self.me) {
            return None;
        }
        let ready = crate::control::reconciler::responsive(p.group_id, &m, &self.liveness);
        p.replicas.iter().copied().find(|r| *r != self.me && in_rack(*r) && ready.contains(r))
    }

    /// A new producer id, unique in the cluster.
    pub async fn init_producer(&self) -> Result<u64, BrokerError> {
        match self.meta.write(MetaCommand::AllocateProducerId, META_WRITE_TIMEOUT).await? {
            MetaReply::ProducerId(id) => Ok(id),
            other => Err(BrokerError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Checks a batch against the limits and stamps its timestamps.
    fn to_stored(
        &self,
        topic: &TopicRecord,
        records: Vec<NewRecord>,
    ) -> Result<Vec<StoredRecord>, BrokerError> {
        let max_event = topic.max_event_bytes().unwrap_or(self.limits.max_event_bytes) as usize;
        if records.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "records: a produce request needs at least one record".into(),
            ));
        }
        if records.len() > self.limits.max_batch_records as usize {
            return Err(BrokerError::InvalidArgument(format!(
                "records: {} records exceed the limit of {} per request",
                records.len(),
                self.limits.max_batch_records
            )));
        }
        let now = self.clock.now_ms();
        let log_append_time = topic.log_append_time();
        let mut total = 0usize;
        let mut out = Vec::with_capacity(records.len());
        for (i, r) in records.into_iter().enumerate() {
            let rec = StoredRecord {
                key: r.key,
                value: r.value,
                headers: r.headers,
                timestamp_ms: record_timestamp(r.timestamp_ms, now, log_append_time),
            };
            let size = rec.size();
            if size > max_event {
                return Err(BrokerError::TooLarge(format!(
                    "records[{i}]: event of {size} bytes exceeds the maximum event size of {max_event} bytes"
                )));
            }
            total += size;
            out.push(rec);
        }
        if total > self.limits.max_request_bytes as usize {
            return Err(BrokerError::TooLarge(format!(
                "records: {total} bytes exceed the request limit of {} bytes",
                self.limits.max_request_bytes
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::record_timestamp;

    #[test]
    fn timestamps_follow_the_topics_timestamp_type() {
        // (producer's timestamp, log-append?, expected) with the leader's clock at 500.
        for (given, log_append, expect) in
            [(Some(7), false, 7), (None, false, 500), (Some(7), true, 500), (None, true, 500)]
        {
            assert_eq!(record_timestamp(given, 500, log_append), expect, "{given:?} log-append {log_append}");
        }
    }
}
