//! `Metadata`: the brokers (nodes with a Kafka listener, with their racks) and each topic's
//! partitions with leader, replicas and in-sync replicas, from this node's metadata view and the
//! cluster status it gathered (at most a moment old, as the gRPC `Metadata` answer). With
//! `auto_create_topics`, a topic that is asked for and does not exist is created.

use eddy_raft::NodeId;
use kafka_protocol::messages::BrokerId;
use kafka_protocol::messages::MetadataRequest;
use kafka_protocol::messages::MetadataResponse;
use kafka_protocol::messages::TopicName;
use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
use kafka_protocol::messages::metadata_response::MetadataResponsePartition;
use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
use kafka_protocol::protocol::StrBytes;

use super::Settings;
use super::codes;
use crate::error::BrokerError;
use crate::limits;
use crate::meta::state::NodeState;
use crate::meta::state::TopicRecord;
use crate::security::Caller;
use crate::security::acl::Operation;
use crate::security::acl::ResourceType;
use crate::service::BrokerState;
use crate::service::topics::NewTopic;
use crate::status::Merged;

/// Kafka's id for a node. Kafka broker ids are 32-bit; a node id beyond that has none (-1).
pub fn broker_id(id: NodeId) -> BrokerId {
    BrokerId(i32::try_from(id).unwrap_or(-1))
}

/// `host:port` split for Kafka's broker records; `None` when it is not one.
pub fn host_port(addr: &str) -> Option<(StrBytes, i32)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((StrBytes::from_string(host.to_owned()), i32::from(port)))
}

/// The cluster's nodes that are not removed: what a default replication factor is capped by.
pub fn members(broker: &BrokerState) -> usize {
    broker.meta.view().state.nodes.values().filter(|n| n.state != NodeState::Removed).count()
}

pub async fn metadata(
    broker: &BrokerState,
    caller: &Caller,
    settings: &Settings,
    req: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    // v0-v3 always allow it; v4 added the client's switch (a consumer turns it off).
    let may_create = settings.auto_create_topics && (version < 4 || req.allow_auto_topic_creation);
    // Topics created here: Kafka answers them LEADER_NOT_AVAILABLE at once, and the client asks
    // again; waiting (briefly) for their leaders answers them whole, and keeps a client from
    // taking a partition without a leader yet for an error (librdkafka's offsetsForTimes does).
    let mut not_created = std::collections::BTreeMap::new();
    if may_create && let Some(topics) = &req.topics {
        let view = broker.meta.view();
        for name in topics.iter().filter_map(|t| t.name.as_ref()) {
            if !view.state.topics.contains_key(name.as_str()) && !not_created.contains_key(name.as_str()) {
                // Kafka's rule: create on the cluster, or on the topic.
                let code = if caller.allows(Operation::Create, ResourceType::Cluster, "")
                    || caller.allows(Operation::Create, ResourceType::Topic, name.as_str())
                {
                    auto_create(broker, settings, name.as_str()).await
                } else {
                    codes::TOPIC_AUTHORIZATION_FAILED
                };
                not_created.insert(name.to_string(), code);
            }
        }
        // One bound for the whole request, however many topics it created.
        let deadline = tokio::time::Instant::now() + AUTO_CREATE_WAIT;
        for (name, _) in not_created.iter().filter(|(_, code)| **code == codes::LEADER_NOT_AVAILABLE) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            broker.await_view(left, |v| v.state.topics.contains_key(name.as_str())).await;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            super::admin::await_leaders(broker, name, left).await;
        }
    }
    let mut out = MetadataResponse::default();
    let m = match broker.cluster_metadata(&[]).await {
        Ok(m) => m,
        Err(e) => {
            // Only an unknown topic fails it, and none was named; answer with no brokers, which
            // makes a client ask again.
            tracing::warn!("kafka metadata: {e}");
            return out;
        }
    };
    let mut kafka_nodes = std::collections::BTreeSet::new();
    for (id, n) in &m.view.state.nodes {
        let Some((host, port)) = n.kafka_addr.as_deref().and_then(host_port) else { continue };
        if n.state == NodeState::Removed || broker_id(*id).0 < 0 {
            continue;
        }
        kafka_nodes.insert(*id);
        let mut b = MetadataResponseBroker::default();
        b.node_id = broker_id(*id);
        b.host = host;
        b.port = port;
        if version >= 1 {
            b.rack = n.rack.clone().map(StrBytes::from_string);
        }
        out.brokers.push(b);
    }
    if version >= 2 {
        out.cluster_id = None;
    }
    if version >= 1 && kafka_nodes.contains(&broker.me) {
        // Any node creates topics and changes configurations (it forwards to the metadata
        // leader), so this node is as good a "controller" as any, and reachable. Until it is
        // among the brokers (registered), there is none (-1), and clients ask again.
        out.controller_id = broker_id(broker.me);
    }
    // v0: an empty list means every topic; v1 and later: null means every topic.
    let wanted: Option<Vec<Option<TopicName>>> = match req.topics {
        None => None,
        Some(t) if t.is_empty() && version == 0 => None,
        Some(t) => Some(t.into_iter().map(|t| t.name).collect()),
    };
    let describe = |t: &TopicRecord| topic(t, &m.status.partitions, &kafka_nodes);
    match wanted {
        // Every topic: those the caller may describe.
        None => {
            out.topics = m
                .topics
                .iter()
                .filter(|t| caller.allows(Operation::Describe, ResourceType::Topic, &t.name))
                .map(|t| describe(t))
                .collect();
        }
        Some(names) => {
            for name in names {
                let mut unknown = MetadataResponseTopic::default();
                match name {
                    // Refused whether or not it exists: its existence is not for this caller.
                    Some(name) if !caller.allows(Operation::Describe, ResourceType::Topic, name.as_str()) => {
                        unknown.error_code = codes::TOPIC_AUTHORIZATION_FAILED;
                        unknown.name = Some(name);
                        out.topics.push(unknown);
                    }
                    Some(name) => match m.view.state.topics.get(name.as_str()) {
                        Some(t) => out.topics.push(describe(t)),
                        None => {
                            unknown.error_code = not_created
                                .get(name.as_str())
                                .copied()
                                .unwrap_or(codes::UNKNOWN_TOPIC_OR_PARTITION);
                            unknown.name = Some(name);
                            out.topics.push(unknown);
                        }
                    },
                    None => {
                        // A topic named by id only (v10 and later): Eddy's topics have no ids.
                        unknown.error_code = codes::UNKNOWN_TOPIC_ID;
                        unknown.name = None;
                        out.topics.push(unknown);
                    }
                }
            }
        }
    }
    out
}

/// How long a `Metadata` that created a topic waits for it to show with its leaders.
const AUTO_CREATE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Creates a topic a client asked for (`auto_create_topics`) with the broker's defaults:
/// `LEADER_NOT_AVAILABLE` when it was created (or already was), as Kafka answers such a topic,
/// or why it could not be.
async fn auto_create(broker: &BrokerState, settings: &Settings, name: &str) -> i16 {
    if let Err(e) = limits::validate_topic_name("topic", name) {
        tracing::debug!("kafka metadata: not creating {name:?}: {e}");
        return codes::INVALID_TOPIC_EXCEPTION;
    }
    let new = NewTopic {
        name: name.to_owned(),
        partitions: settings.default_partitions,
        replication_factor: settings.replication_for(members(broker)),
        config: Default::default(),
    };
    match broker.create_topic(new).await {
        Ok(_) => {
            tracing::info!(topic = name, "created a topic a Kafka client asked for (auto_create_topics)");
            codes::LEADER_NOT_AVAILABLE
        }
        Err(BrokerError::TopicExists(_)) => codes::LEADER_NOT_AVAILABLE,
        Err(e) => {
            tracing::warn!(topic = name, "kafka metadata: auto-creating the topic failed: {e}");
            codes::code(&e)
        }
    }
}

fn topic(
    t: &TopicRecord,
    status: &std::collections::BTreeMap<eddy_raft::GroupId, Merged>,
    kafka_nodes: &std::collections::BTreeSet<NodeId>,
) -> MetadataResponseTopic {
    let mut out = MetadataResponseTopic::default();
    out.name = Some(TopicName(StrBytes::from_string(t.name.clone())));
    out.partitions = t
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut kp = MetadataResponsePartition::default();
            kp.partition_index = i as i32;
            let merged = status.get(&p.group_id);
            let leader = merged.and_then(|m| m.leader).filter(|l| kafka_nodes.contains(l));
            match leader {
                Some(l) => kp.leader_id = broker_id(l),
                None => {
                    kp.leader_id = BrokerId(-1);
                    kp.error_code = codes::LEADER_NOT_AVAILABLE;
                }
            }
            kp.replica_nodes = p.replicas.iter().map(|r| broker_id(*r)).collect();
            let in_sync = match merged {
                Some(m) if m.from_leader && !m.in_sync.is_empty() => m.in_sync.clone(),
                _ => leader.into_iter().collect(),
            };
            kp.isr_nodes = in_sync.iter().map(|r| broker_id(*r)).collect();
            kp
        })
        .collect();
    out
}
