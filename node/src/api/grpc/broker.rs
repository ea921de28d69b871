//! `eddy.v1.Broker`: the client API. Converts wire types at the boundary, validates every field
//! (naming it in the error), and calls the services (`crate::service`).

use std::collections::BTreeMap;
use std::sync::Arc;

use eddy_proto::v1 as pb;
use eddy_proto::v1::broker_server::Broker;
use eddy_raft::GroupId;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::error::BrokerError;
use crate::limits;
use crate::meta::state::TopicRecord;
use crate::metrics::NodeMetrics;
use crate::partition::handle::OffsetSpec;
use crate::security::Caller;
use crate::security::acl::Operation;
use crate::security::acl::ResourceType;
use crate::security::quota::Direction;
use crate::service::BrokerState;
use crate::service::data::Fetch;
use crate::service::data::NewRecord;
use crate::service::data::Produce;
use crate::service::topics::NewTopic;
use crate::status::Merged;

pub struct BrokerService {
    state: Arc<BrokerState>,
}

impl BrokerService {
    pub fn new(state: Arc<BrokerState>) -> Self {
        Self { state }
    }

    async fn produce_inner(&self, req: pb::ProduceRequest) -> Result<pb::ProduceResponse, BrokerError> {
        limits::validate_topic_name("topic", &req.topic)?;
        let records = req
            .records
            .into_iter()
            .map(|r| NewRecord {
                key: r.key,
                value: r.value,
                headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
                timestamp_ms: r.timestamp_ms,
            })
            .collect();
        let r = self
            .state
            .produce(Produce {
                topic: req.topic,
                partition: req.partition,
                records,
                producer_id: req.producer_id,
                base_sequence: req.base_sequence,
                timeout_ms: req.timeout_ms,
            })
            .await?;
        Ok(pb::ProduceResponse {
            partition: r.partition,
            base_offset: r.produced.base_offset,
            count: r.produced.count,
            duplicate: r.produced.duplicate,
            node_id: self.state.me,
        })
    }

    async fn fetch_inner(&self, req: pb::FetchRequest) -> Result<pb::FetchResponse, BrokerError> {
        limits::validate_topic_name("topic", &req.topic)?;
        let f = self
            .state
            .fetch(Fetch {
                topic: req.topic,
                partition: req.partition,
                offset: req.offset,
                max_bytes: req.max_bytes,
                max_records: req.max_records,
                max_wait_ms: req.max_wait_ms,
            })
            .await?;
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
        let o = self.state.list_offset(&req.topic, req.partition, spec)?;
        Ok(pb::ListOffsetsResponse {
            offset: o.offset,
            timestamp_ms: o.timestamp_ms,
            log_start_offset: o.log_start_offset,
            high_watermark: o.high_watermark,
            node_id: self.state.me,
        })
    }
}

/// The bytes of a record that count against a produce quota: key, value and headers.
fn record_bytes(r: &pb::Record) -> u64 {
    let key = r.key.as_ref().map_or(0, |k| k.len());
    (key + r.value.len() + r.headers.iter().map(|h| h.key.len() + h.value.len()).sum::<usize>()) as u64
}

/// A topic's wire form, with each partition's progress as the cluster reported it.
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

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        if !caller.allows(Operation::Create, ResourceType::Cluster, "") {
            caller.check(Operation::Create, ResourceType::Topic, &req.name)?;
        }
        let t = self
            .state
            .create_topic(NewTopic {
                name: req.name,
                partitions: req.partitions,
                replication_factor: req.replication_factor,
                config: req.config.into_iter().collect(),
            })
            .await?;
        Ok(Response::new(pb::CreateTopicResponse { topic: Some(topic_metadata(&t, &BTreeMap::new())) }))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let view = self.state.meta.serving_view().await?;
        let topics = view
            .state
            .topics
            .values()
            .filter(|t| caller.allows(Operation::Describe, ResourceType::Topic, &t.name))
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
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        limits::validate_topic_name("name", &req.name)?;
        caller.check(Operation::Describe, ResourceType::Topic, &req.name)?;
        // Placement as of a view confirmed current (a removed node's would send clients to
        // replicas that moved away long ago).
        let view = self.state.meta.serving_view().await?;
        let t = view.state.topics.get(&req.name).cloned().ok_or(BrokerError::UnknownTopic(req.name))?;
        let status = self.state.cluster_status().await;
        Ok(Response::new(pb::DescribeTopicResponse { topic: Some(topic_metadata(&t, &status.partitions)) }))
    }

    async fn metadata(
        &self,
        request: Request<pb::MetadataRequest>,
    ) -> Result<Response<pb::MetadataResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        for name in &req.topics {
            limits::validate_topic_name("topics", name)?;
            caller.check(Operation::Describe, ResourceType::Topic, name)?;
        }
        let m = self.state.cluster_metadata(&req.topics).await?;
        let topics = m
            .topics
            .iter()
            .filter(|t| caller.allows(Operation::Describe, ResourceType::Topic, &t.name))
            .map(|t| topic_metadata(t, &m.status.partitions))
            .collect();
        let nodes = m
            .view
            .state
            .nodes
            .iter()
            .map(|(id, n)| pb::NodeInfo {
                id: *id,
                client_addr: n.addr.client_addr.clone(),
                raft_addr: n.addr.raft_addr.clone(),
                state: n.state.as_str().to_owned(),
                kafka_addr: n.kafka_addr.clone(),
                rack: n.rack.clone(),
            })
            .collect();
        Ok(Response::new(pb::MetadataResponse {
            nodes,
            metadata_leader: m.metadata_leader,
            topics,
            node_id: self.state.me,
            limits: Some(self.state.limits.to_proto()),
        }))
    }

    async fn init_producer(
        &self,
        _: Request<pb::InitProducerRequest>,
    ) -> Result<Response<pb::InitProducerResponse>, Status> {
        let producer_id = self.state.init_producer().await?;
        Ok(Response::new(pb::InitProducerResponse { producer_id }))
    }

    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceResponse>, Status> {
        let started = tokio::time::Instant::now();
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let bytes: u64 = req.records.iter().map(record_bytes).sum();
        let r = match caller.check(Operation::Write, ResourceType::Topic, &req.topic) {
            // Admitted under the user's quota before anything is written.
            Ok(()) => match self.state.security.admit(&caller.principal, Direction::Produce, bytes).await {
                Ok(()) => self.produce_inner(req).await,
                Err(wait) => Err(BrokerError::Throttled {
                    message: format!(
                        "{} is over its produce quota; retry in {} ms (nothing was written)",
                        caller.principal,
                        wait.as_millis()
                    ),
                    retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                }),
            },
            Err(e) => Err(e),
        };
        let m = &self.state.metrics;
        NodeMetrics::observe_request(&m.produce_requests, &m.produce_latency, started.elapsed(), &r);
        r.map(Response::new).map_err(Status::from)
    }

    async fn fetch(&self, request: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        let started = tokio::time::Instant::now();
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let r = match caller.check(Operation::Read, ResourceType::Topic, &req.topic) {
            Ok(()) => {
                // A user over its fetch quota waits (bounded) before it reads more.
                let _ = self.state.security.admit(&caller.principal, Direction::Fetch, 0).await;
                self.fetch_inner(req).await
            }
            Err(e) => Err(e),
        };
        if let Ok(f) = &r {
            let bytes: usize = f
                .records
                .iter()
                .map(|r| {
                    let key = r.key.as_ref().map_or(0, |k| k.len());
                    key + r.value.len() + r.headers.iter().map(|h| h.key.len() + h.value.len()).sum::<usize>()
                })
                .sum();
            self.state.security.charge(&caller.principal, Direction::Fetch, bytes as u64);
        }
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
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        caller.check(Operation::Describe, ResourceType::Topic, &req.topic)?;
        self.list_offsets_inner(req).map(Response::new).map_err(Status::from)
    }
}
