//! `Metadata`: the brokers (nodes with a Kafka listener, with their racks) and each topic's
//! partitions with leader, replicas and in-sync replicas, from this node's metadata view and the
//! cluster status it gathered (at most a moment old, as the gRPC `Metadata` answer).

use eddy_raft::NodeId;
use kafka_protocol::messages::BrokerId;
use kafka_protocol::messages::MetadataRequest;
use kafka_protocol::messages::MetadataResponse;
use kafka_protocol::messages::TopicName;
use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
use kafka_protocol::messages::metadata_response::MetadataResponsePartition;
use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
use kafka_protocol::protocol::StrBytes;

use super::codes;
use crate::meta::state::NodeState;
use crate::meta::state::TopicRecord;
use crate::service::BrokerState;
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

pub async fn metadata(broker: &BrokerState, req: MetadataRequest, version: i16) -> MetadataResponse {
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
        None => out.topics = m.topics.iter().map(|t| describe(t)).collect(),
        Some(names) => {
            for name in names {
                let mut unknown = MetadataResponseTopic::default();
                match name {
                    Some(name) => match m.view.state.topics.get(name.as_str()) {
                        Some(t) => out.topics.push(describe(t)),
                        None => {
                            unknown.error_code = codes::UNKNOWN_TOPIC_OR_PARTITION;
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
