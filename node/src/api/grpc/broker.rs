//! `eddy.v1.Broker`: the client API. Converts wire types at the boundary, validates every field
//! (naming it in the error), and hands the work to the metadata handle or a partition replica.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use eddy_proto::v1 as pb;
use eddy_proto::v1::broker_server::Broker;
use eddy_raft::GroupId;
use eddy_raft::NodeId;
use eddy_raft::transport::Peers;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::env::Clock;
use crate::error::BrokerError;
use crate::limits;
use crate::limits::Limits;
use crate::manager::Groups;
use crate::meta::MetaCommand;
use crate::meta::MetaError;
use crate::meta::MetaHandle;
use crate::meta::MetaReply;
use crate::meta::state::PartitionRecord;
use crate::meta::state::TopicRecord;
use crate::metrics::NodeMetrics;
use crate::partition::command::ProduceBatch;
use crate::partition::command::StoredRecord;
use crate::partition::handle::OffsetSpec;
use crate::status::Merged;

/// How long a metadata write (topic creation, producer id) may take.
const META_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the client services share.
pub struct BrokerState {
    pub me: NodeId,
    pub limits: Limits,
    pub meta: MetaHandle,
    pub groups: Arc<Groups>,
    pub clock: Arc<dyn Clock>,
    /// Channels to other nodes' client ports (for cluster-wide status).
    pub client_peers: Arc<Peers>,
    pub metrics: Arc<NodeMetrics>,
    pub liveness: Arc<eddy_raft::liveness::Liveness>,
    /// The last cluster status gathered, and when (see [`BrokerState::cluster_status`]).
    pub status_cache: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<crate::status::ClusterStatus>)>>,
    /// This node's own report, for `recent` asks (see `BrokerState::recent_local_status`).
    pub local_status_cache: std::sync::Mutex<Option<(tokio::time::Instant, Arc<pb::NodeStatusResponse>)>>,
}

pub struct BrokerService {
    state: Arc<BrokerState>,
}

impl BrokerService {
    pub fn new(state: Arc<BrokerState>) -> Self {
        Self { state }
    }

    async fn produce_inner(&self, req: pb::ProduceRequest) -> Result<pb::ProduceResponse, BrokerError> {
        limits::validate_topic_name("topic", &req.topic)?;
        let topic = self.state.topic(&req.topic)?;
        let n = topic.partitions.len() as u32;
        let partition = match req.partition {
            Some(p) => p,
            None => match req.records.first().and_then(|r| r.key.as_ref()) {
                Some(k) => eddy_proto::partition_for_key(k, n),
                None => 0,
            },
        };
        let pi = partition_index(&topic, partition)?;
        let records = self.state.to_stored(&topic, req.records)?;
        let group = topic.partitions[pi].group_id;
        let Some(h) = self.state.groups.get(group) else {
            return Err(BrokerError::NotLeader {
                what: format!("{}/{partition}", topic.name),
                me: self.state.me,
                leader: None,
                leader_addr: None,
            });
        };
        let timeout_ms = match req.timeout_ms {
            0 => limits::PRODUCE_TIMEOUT_MS_DEFAULT,
            t => t.min(limits::PRODUCE_TIMEOUT_MS_MAX),
        };
        let batch = ProduceBatch { producer_id: req.producer_id, base_sequence: req.base_sequence, records };
        let r = h.produce(batch, Duration::from_millis(u64::from(timeout_ms))).await?;
        self.state.metrics.produce_records.inc_by(u64::from(r.count));
        Ok(pb::ProduceResponse {
            partition,
            base_offset: r.base_offset,
            count: r.count,
            duplicate: r.duplicate,
            node_id: self.state.me,
        })
    }

    async fn fetch_inner(&self, req: pb::FetchRequest) -> Result<pb::FetchResponse, BrokerError> {
        limits::validate_topic_name("topic", &req.topic)?;
        let (topic, p) = self.state.partition(&req.topic, req.partition)?;
        let Some(h) = self.state.groups.get(p.group_id) else {
            return Err(BrokerError::NotReplica {
                what: format!("{}/{}", topic.name, req.partition),
                me: self.state.me,
                replicas: p.replicas.clone(),
            });
        };
        let max_bytes = match req.max_bytes {
            0 => 1 << 20,
            b => b.min(self.state.limits.max_fetch_bytes),
        } as usize;
        let max_records = match req.max_records {
            0 => usize::MAX,
            r => r as usize,
        };
        let wait = Duration::from_millis(u64::from(req.max_wait_ms.min(limits::FETCH_WAIT_MS_MAX)));
        let f = h.fetch(req.offset, max_bytes, max_records, wait).await?;
        let records: Vec<pb::FetchedRecord> = f
            .records
            .into_iter()
            .map(|r| pb::FetchedRecord {
                offset: r.offset,
                key: r.record.key,
                value: r.record.value,
                headers: r.record.headers.into_iter().map(|(key, value)| pb::Header { key, value }).collect(),
                timestamp_ms: r.record.timestamp_ms,
            })
            .collect();
        self.state.metrics.fetch_records.inc_by(records.len() as u64);
        Ok(pb::FetchResponse {
            records,
            high_watermark: f.high_watermark,
            log_start_offset: f.log_start_offset,
            node_id: self.state.me,
            next_offset: f.next_offset,
        })
    }

    fn list_offsets_inner(
        &self,
        req: pb::ListOffsetsRequest,
    ) -> Result<pb::ListOffsetsResponse, BrokerError> {
        limits::validate_topic_name("topic", &req.topic)?;
        let spec = match pb::OffsetSpec::try_from(req.spec) {
            Ok(pb::OffsetSpec::Earliest) => OffsetSpec::Earliest,
            Ok(pb::OffsetSpec::Latest) => OffsetSpec::Latest,
            Ok(pb::OffsetSpec::Timestamp) => OffsetSpec::Timestamp(req.timestamp_ms),
            Ok(pb::OffsetSpec::Unspecified) | Err(_) => {
                return Err(BrokerError::InvalidArgument(format!(
                    "spec: {} is not an offset spec; use EARLIEST, LATEST or TIMESTAMP",
                    req.spec
                )));
            }
        };
        let (topic, p) = self.state.partition(&req.topic, req.partition)?;
        let Some(h) = self.state.groups.get(p.group_id) else {
            return Err(BrokerError::NotReplica {
                what: format!("{}/{}", topic.name, req.partition),
                me: self.state.me,
                replicas: p.replicas.clone(),
            });
        };
        let o = h.list_offset(spec)?;
        Ok(pb::ListOffsetsResponse {
            offset: o.offset,
            timestamp_ms: o.timestamp_ms,
            log_start_offset: o.log_start_offset,
            high_watermark: o.high_watermark,
            node_id: self.state.me,
        })
    }
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
    /// A topic and one of its partitions, or the error naming which does not exist.
    pub fn partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(Arc<TopicRecord>, PartitionRecord), BrokerError> {
        let t = self.topic(topic)?;
        let i = partition_index(&t, partition)?;
        let p = t.partitions[i].clone();
        Ok((t, p))
    }

    /// A topic's record, shared with the metadata view (not copied: a topic may have thousands
    /// of partitions, and this runs for every produce).
    pub fn topic(&self, name: &str) -> Result<Arc<TopicRecord>, BrokerError> {
        self.meta
            .view()
            .state
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))
    }

    pub fn topic_metadata(t: &TopicRecord, merged: &BTreeMap<GroupId, Merged>) -> pb::TopicMetadata {
        pb::TopicMetadata {
            name: t.name.clone(),
            replication_factor: t.replication_factor,
            config: t.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            partitions: t
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    // Borrowed: a metadata answer covers every partition of the cluster.
                    let m = merged.get(&p.group_id);
                    pb::PartitionMetadata {
                        partition: i as u32,
                        group_id: p.group_id,
                        leader: m.and_then(|m| m.leader),
                        replicas: p.replicas.clone(),
                        high_watermark: m.map_or(0, |m| m.hw),
                        log_start_offset: m.map_or(0, |m| m.log_start),
                        term: m.map_or(0, |m| m.term),
                    }
                })
                .collect(),
        }
    }

    fn to_stored(
        &self,
        topic: &TopicRecord,
        records: Vec<pb::Record>,
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
                headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
                timestamp_ms: record_timestamp(r.timestamp_ms, now, log_append_time),
            };
            let size = rec.size();
            if size > max_event {
                return Err(BrokerError::InvalidArgument(format!(
                    "records[{i}]: event of {size} bytes exceeds the maximum event size of {max_event} bytes"
                )));
            }
            total += size;
            out.push(rec);
        }
        if total > self.limits.max_request_bytes as usize {
            return Err(BrokerError::InvalidArgument(format!(
                "records: {total} bytes exceed the request limit of {} bytes",
                self.limits.max_request_bytes
            )));
        }
        Ok(out)
    }
}

pub fn meta_error(e: MetaError) -> BrokerError {
    match e {
        MetaError::TopicExists(t) => BrokerError::TopicExists(t),
        MetaError::NotEnoughNodes { replication_factor, nodes } => BrokerError::NotEnoughNodes(format!(
            "replication_factor: {replication_factor} exceeds the {nodes} nodes in the cluster"
        )),
        MetaError::Invalid(m) => BrokerError::InvalidArgument(m),
        MetaError::UnknownTopic(t) => BrokerError::UnknownTopic(t),
        MetaError::UnknownPartition { topic, partition, count } => {
            BrokerError::UnknownPartition { topic, partition, count }
        }
        MetaError::UnknownNode(n) => {
            BrokerError::InvalidArgument(format!("node {n} is not a member of the cluster"))
        }
        MetaError::NowhereToGo(m) => BrokerError::NotEnoughNodes(m),
        MetaError::Conflict(m) => BrokerError::Conflict(m),
        MetaError::UnknownGroup(g) => BrokerError::UnknownGroup(g),
        MetaError::Fenced(m) => BrokerError::Fenced(m),
    }
}

fn partition_index(topic: &TopicRecord, p: u32) -> Result<usize, BrokerError> {
    if (p as usize) < topic.partitions.len() {
        Ok(p as usize)
    } else {
        Err(BrokerError::UnknownPartition {
            topic: topic.name.clone(),
            partition: p,
            count: topic.partitions.len() as u32,
        })
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let req = request.into_inner();
        limits::validate_topic_name("name", &req.name)?;
        if req.partitions == 0 || req.partitions > limits::PARTITIONS_MAX {
            return Err(BrokerError::InvalidArgument(format!(
                "partitions: {} is out of range; a topic has 1 to {} partitions",
                req.partitions,
                limits::PARTITIONS_MAX
            ))
            .into());
        }
        if req.replication_factor == 0 || req.replication_factor > limits::REPLICATION_FACTOR_MAX {
            return Err(BrokerError::InvalidArgument(format!(
                "replication_factor: {} is out of range; it must be 1 to {}",
                req.replication_factor,
                limits::REPLICATION_FACTOR_MAX
            ))
            .into());
        }
        let config: BTreeMap<String, String> = req.config.into_iter().collect();
        limits::validate_topic_config(&config)?;
        let cmd = MetaCommand::CreateTopic {
            name: req.name,
            partitions: req.partitions,
            replication_factor: req.replication_factor,
            config,
        };
        match self.state.meta.write(cmd, META_WRITE_TIMEOUT).await? {
            MetaReply::TopicCreated(t) => Ok(Response::new(pb::CreateTopicResponse {
                topic: Some(BrokerState::topic_metadata(&t, &BTreeMap::new())),
            })),
            MetaReply::Error(e) => Err(meta_error(e).into()),
            other => Err(BrokerError::Internal(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn list_topics(
        &self,
        _: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let view = self.state.meta.view();
        let topics = view
            .state
            .topics
            .values()
            .map(|t| pb::TopicSummary {
                name: t.name.clone(),
                partitions: t.partitions.len() as u32,
                replication_factor: t.replication_factor,
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let req = request.into_inner();
        limits::validate_topic_name("name", &req.name)?;
        let t = self.state.topic(&req.name)?;
        let status = self.state.cluster_status().await;
        Ok(Response::new(pb::DescribeTopicResponse {
            topic: Some(BrokerState::topic_metadata(&t, &status.partitions)),
        }))
    }

    async fn metadata(
        &self,
        request: Request<pb::MetadataRequest>,
    ) -> Result<Response<pb::MetadataResponse>, Status> {
        let req = request.into_inner();
        let view = self.state.meta.view();
        let mut topics = Vec::new();
        if !view.state.topics.is_empty() {
            let status = self.state.recent_cluster_status().await;
            let merged = &status.partitions;
            for name in &req.topics {
                limits::validate_topic_name("topics", name)?;
                if !view.state.topics.contains_key(name) {
                    return Err(BrokerError::UnknownTopic(name.clone()).into());
                }
            }
            for t in view.state.topics.values() {
                if req.topics.is_empty() || req.topics.contains(&t.name) {
                    topics.push(BrokerState::topic_metadata(t, merged));
                }
            }
        } else if let Some(name) = req.topics.first() {
            return Err(BrokerError::UnknownTopic(name.clone()).into());
        }
        let nodes = view
            .state
            .nodes
            .iter()
            .map(|(id, n)| pb::NodeInfo {
                id: *id,
                client_addr: n.addr.client_addr.clone(),
                raft_addr: n.addr.raft_addr.clone(),
                state: n.state.as_str().to_owned(),
            })
            .collect();
        Ok(Response::new(pb::MetadataResponse {
            nodes,
            metadata_leader: self.state.meta.leader(),
            topics,
            node_id: self.state.me,
            limits: Some(self.state.limits.to_proto()),
        }))
    }

    async fn init_producer(
        &self,
        _: Request<pb::InitProducerRequest>,
    ) -> Result<Response<pb::InitProducerResponse>, Status> {
        match self.state.meta.write(MetaCommand::AllocateProducerId, META_WRITE_TIMEOUT).await? {
            MetaReply::ProducerId(id) => Ok(Response::new(pb::InitProducerResponse { producer_id: id })),
            MetaReply::Error(e) => Err(meta_error(e).into()),
            other => Err(BrokerError::Internal(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceResponse>, Status> {
        let started = tokio::time::Instant::now();
        let r = self.produce_inner(request.into_inner()).await;
        let m = &self.state.metrics;
        NodeMetrics::observe_request(&m.produce_requests, &m.produce_latency, started.elapsed(), &r);
        r.map(Response::new).map_err(Status::from)
    }

    async fn fetch(&self, request: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        let started = tokio::time::Instant::now();
        let r = self.fetch_inner(request.into_inner()).await;
        let m = &self.state.metrics;
        NodeMetrics::observe_request(&m.fetch_requests, &m.fetch_latency, started.elapsed(), &r);
        r.map(Response::new).map_err(Status::from)
    }

    async fn node_status(
        &self,
        request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusResponse>, Status> {
        if request.into_inner().recent {
            return Ok(Response::new(self.state.recent_local_status().as_ref().clone()));
        }
        Ok(Response::new(self.state.local_status()))
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsResponse>, Status> {
        self.list_offsets_inner(request.into_inner()).map(Response::new).map_err(Status::from)
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
