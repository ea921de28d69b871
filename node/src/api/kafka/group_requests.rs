//! The consumer-group APIs' wire side: each request checked for the coordinator, converted,
//! and answered from [`super::groups::KafkaGroups`] and the committed offsets in the metadata.

use bytes::Bytes;
use kafka_protocol::messages::DescribeGroupsRequest;
use kafka_protocol::messages::DescribeGroupsResponse;
use kafka_protocol::messages::FindCoordinatorRequest;
use kafka_protocol::messages::FindCoordinatorResponse;
use kafka_protocol::messages::GroupId;
use kafka_protocol::messages::HeartbeatRequest;
use kafka_protocol::messages::HeartbeatResponse;
use kafka_protocol::messages::JoinGroupRequest;
use kafka_protocol::messages::JoinGroupResponse;
use kafka_protocol::messages::LeaveGroupRequest;
use kafka_protocol::messages::LeaveGroupResponse;
use kafka_protocol::messages::ListGroupsRequest;
use kafka_protocol::messages::ListGroupsResponse;
use kafka_protocol::messages::OffsetCommitRequest;
use kafka_protocol::messages::OffsetCommitResponse;
use kafka_protocol::messages::OffsetFetchRequest;
use kafka_protocol::messages::OffsetFetchResponse;
use kafka_protocol::messages::SyncGroupRequest;
use kafka_protocol::messages::SyncGroupResponse;
use kafka_protocol::messages::TopicName;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use kafka_protocol::messages::describe_groups_response::DescribedGroupMember;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::OffsetCommitResponsePartition;
use kafka_protocol::messages::offset_commit_response::OffsetCommitResponseTopic;
use kafka_protocol::messages::offset_fetch_response::OffsetFetchResponsePartition;
use kafka_protocol::messages::offset_fetch_response::OffsetFetchResponseTopic;
use kafka_protocol::protocol::StrBytes;

use super::codes;
use super::groups;
use super::groups::Join;
use super::groups::KafkaGroups;
use super::metadata::broker_id;
use super::metadata::host_port;
use crate::security::Caller;
use crate::security::acl::Operation;
use crate::security::acl::ResourceType;
use crate::service::BrokerState;

/// The longest metadata string an offset commit may carry (Kafka's `offset.metadata.max.bytes`
/// default); a longer one is refused with `OFFSET_METADATA_TOO_LARGE`.
pub const OFFSET_METADATA_BYTES_MAX: usize = 4096;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

/// FindCoordinator: the metadata leader coordinates every group.
pub fn find_coordinator(
    broker: &BrokerState,
    caller: &Caller,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let view = broker.meta.view();
    let found = match req.key_type {
        0 => broker
            .meta
            .leader()
            .and_then(|l| Some((l, host_port(view.state.nodes.get(&l)?.kafka_addr.as_deref()?)?)))
            .ok_or((
                codes::COORDINATOR_NOT_AVAILABLE,
                "the metadata group has no leader with a Kafka listener yet",
            )),
        _ => Err((
            codes::COORDINATOR_NOT_AVAILABLE,
            "only consumer groups have coordinators here (no transactions)",
        )),
    };
    let mut out = FindCoordinatorResponse::default();
    let keys = if version >= 4 { req.coordinator_keys } else { vec![req.key] };
    for key in keys {
        let mut c = Coordinator::default();
        let allowed = caller.allows(Operation::Describe, ResourceType::Group, key.as_str());
        c.key = key;
        match &found {
            _ if !allowed => {
                c.error_code = codes::GROUP_AUTHORIZATION_FAILED;
                c.error_message = Some(s(format!("{} may not describe the group", caller.principal)));
                c.node_id = (-1).into();
            }
            Ok((id, (host, port))) => {
                c.node_id = broker_id(*id);
                c.host = host.clone();
                c.port = *port;
            }
            Err((code, message)) => {
                c.error_code = *code;
                c.error_message = Some(s(*message));
                c.node_id = (-1).into();
            }
        }
        if version >= 4 {
            out.coordinators.push(c);
        } else {
            out.error_code = c.error_code;
            out.node_id = c.node_id;
            out.host = c.host;
            out.port = c.port;
            if version >= 1 {
                out.error_message = c.error_message;
            }
        }
    }
    out
}

pub async fn join_group(
    broker: &BrokerState,
    groups: &KafkaGroups,
    req: JoinGroupRequest,
    version: i16,
    client_id: &str,
    client_host: &str,
) -> JoinGroupResponse {
    let mut out = JoinGroupResponse::default();
    let joined = if groups::is_coordinator(broker, groups) {
        groups
            .join(Join {
                group: req.group_id.to_string(),
                member_id: req.member_id.to_string(),
                client_id: client_id.to_owned(),
                client_host: client_host.to_owned(),
                session_timeout_ms: req.session_timeout_ms,
                rebalance_timeout_ms: if version >= 1 {
                    req.rebalance_timeout_ms
                } else {
                    req.session_timeout_ms
                },
                protocol_type: req.protocol_type.to_string(),
                protocols: req.protocols.into_iter().map(|p| (p.name.to_string(), p.metadata)).collect(),
                member_id_required: version >= 4,
            })
            .await
    } else {
        groups::Joined { error: codes::NOT_COORDINATOR, ..Default::default() }
    };
    out.error_code = joined.error;
    out.generation_id = if joined.error == codes::NONE { joined.generation } else { -1 };
    out.protocol_name = Some(s(joined.protocol.unwrap_or_default()));
    if version >= 7 {
        out.protocol_type = joined.protocol_type.map(s);
    }
    out.leader = s(joined.leader);
    out.member_id = s(joined.member_id);
    out.members = joined
        .members
        .into_iter()
        .map(|(id, metadata)| {
            let mut m = JoinGroupResponseMember::default();
            m.member_id = s(id);
            m.metadata = metadata;
            m
        })
        .collect();
    out
}

pub async fn sync_group(
    broker: &BrokerState,
    groups: &KafkaGroups,
    req: SyncGroupRequest,
    version: i16,
) -> SyncGroupResponse {
    let mut out = SyncGroupResponse::default();
    let result = if groups::is_coordinator(broker, groups) {
        let assignments =
            req.assignments.into_iter().map(|a| (a.member_id.to_string(), a.assignment)).collect();
        groups.sync(&req.group_id, &req.member_id, req.generation_id, assignments).await
    } else {
        Err(codes::NOT_COORDINATOR)
    };
    match result {
        Ok(a) => out.assignment = a,
        Err(code) => out.error_code = code,
    }
    if version >= 5
        && let Some(d) = groups.describe(&req.group_id)
    {
        out.protocol_type = Some(s(d.protocol_type));
        out.protocol_name = Some(s(d.protocol));
    }
    out
}

pub fn heartbeat(broker: &BrokerState, groups: &KafkaGroups, req: HeartbeatRequest) -> HeartbeatResponse {
    let mut out = HeartbeatResponse::default();
    out.error_code = if groups::is_coordinator(broker, groups) {
        groups.heartbeat(&req.group_id, &req.member_id, req.generation_id)
    } else {
        codes::NOT_COORDINATOR
    };
    out
}

pub fn leave_group(
    broker: &BrokerState,
    groups: &KafkaGroups,
    req: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    let mut out = LeaveGroupResponse::default();
    let members: Vec<String> = if version >= 3 {
        req.members.iter().map(|m| m.member_id.to_string()).collect()
    } else {
        vec![req.member_id.to_string()]
    };
    if !groups::is_coordinator(broker, groups) {
        out.error_code = codes::NOT_COORDINATOR;
        return out;
    }
    let results = groups.leave(&req.group_id, &members);
    if version >= 3 {
        out.members = members
            .into_iter()
            .zip(&results)
            .map(|(id, code)| {
                let mut m = MemberResponse::default();
                m.member_id = s(id);
                m.error_code = *code;
                m
            })
            .collect();
    } else {
        out.error_code = results.first().copied().unwrap_or(codes::NONE);
    }
    out
}

pub async fn offset_commit(
    broker: &BrokerState,
    caller: &Caller,
    groups: &KafkaGroups,
    req: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let error = if !caller.allows(Operation::Read, ResourceType::Group, req.group_id.as_str()) {
        Some(codes::GROUP_AUTHORIZATION_FAILED)
    } else if !groups::is_coordinator(broker, groups) {
        Some(codes::NOT_COORDINATOR)
    } else {
        groups.check_commit(&req.group_id, &req.member_id, req.generation_id_or_member_epoch)
    };
    let view = broker.meta.view();
    // Per partition: its error, or the offset to commit.
    let mut offsets = Vec::new();
    let mut answers: Vec<(TopicName, Vec<(i32, i16)>)> = Vec::new();
    for t in &req.topics {
        let topic = view.state.topics.get(t.name.as_str());
        let topic_allowed = caller.allows(Operation::Read, ResourceType::Topic, t.name.as_str());
        let mut parts = Vec::new();
        for p in &t.partitions {
            let metadata = p.committed_metadata.as_deref().unwrap_or_default();
            let code =
                match (error, topic, u32::try_from(p.partition_index), u64::try_from(p.committed_offset)) {
                    (Some(e), ..) => e,
                    _ if !topic_allowed => codes::TOPIC_AUTHORIZATION_FAILED,
                    (None, Some(_), ..) if metadata.len() > OFFSET_METADATA_BYTES_MAX => {
                        codes::OFFSET_METADATA_TOO_LARGE
                    }
                    (None, Some(topic), Ok(i), Ok(o)) if (i as usize) < topic.partitions.len() => {
                        offsets.push(((t.name.to_string(), i), o, metadata.to_owned()));
                        codes::NONE
                    }
                    (None, Some(_), _, Err(_)) => codes::INVALID_REQUEST,
                    _ => codes::UNKNOWN_TOPIC_OR_PARTITION,
                };
            parts.push((p.partition_index, code));
        }
        answers.push((t.name.clone(), parts));
    }
    if !offsets.is_empty()
        && let Err(code) = groups::commit(broker, &req.group_id, offsets).await
    {
        for (_, parts) in &mut answers {
            for (_, c) in parts.iter_mut().filter(|(_, c)| *c == codes::NONE) {
                *c = code;
            }
        }
    }
    let mut out = OffsetCommitResponse::default();
    out.topics = answers
        .into_iter()
        .map(|(name, parts)| {
            let mut t = OffsetCommitResponseTopic::default();
            t.name = name;
            t.partitions = parts
                .into_iter()
                .map(|(i, code)| {
                    let mut p = OffsetCommitResponsePartition::default();
                    p.partition_index = i;
                    p.error_code = code;
                    p
                })
                .collect();
            t
        })
        .collect();
    out
}

/// OffsetFetch (v0–7: one group): the committed offsets, -1 where there is none, with the
/// metadata strings committed with them.
pub fn offset_fetch(broker: &BrokerState, caller: &Caller, req: OffsetFetchRequest) -> OffsetFetchResponse {
    if !caller.allows(Operation::Describe, ResourceType::Group, req.group_id.as_str()) {
        let mut out = OffsetFetchResponse::default();
        out.error_code = codes::GROUP_AUTHORIZATION_FAILED;
        return out;
    }
    let view = broker.meta.view();
    let group = view.state.groups.get(req.group_id.as_str()).cloned();
    let committed = group.as_ref().map(|g| g.offsets.clone()).unwrap_or_default();
    let asked: Vec<(TopicName, Vec<i32>)> = match req.topics {
        Some(topics) => topics.into_iter().map(|t| (t.name, t.partition_indexes)).collect(),
        // Null (v2 and later): every partition the group has committed.
        None => {
            let mut by_topic: Vec<(TopicName, Vec<i32>)> = Vec::new();
            for (t, p) in
                committed.keys().filter(|(t, _)| caller.allows(Operation::Describe, ResourceType::Topic, t))
            {
                match by_topic.last_mut() {
                    Some((name, ps)) if name.as_str() == t => ps.push(*p as i32),
                    _ => by_topic.push((TopicName(s(t.clone())), vec![*p as i32])),
                }
            }
            by_topic
        }
    };
    let mut out = OffsetFetchResponse::default();
    out.topics = asked
        .into_iter()
        .map(|(name, partitions)| {
            let mut t = OffsetFetchResponseTopic::default();
            let allowed = caller.allows(Operation::Describe, ResourceType::Topic, name.as_str());
            t.partitions = partitions
                .into_iter()
                .map(|i| {
                    let mut p = OffsetFetchResponsePartition::default();
                    p.partition_index = i;
                    if !allowed {
                        p.error_code = codes::TOPIC_AUTHORIZATION_FAILED;
                        p.committed_offset = -1;
                        return p;
                    }
                    let key = u32::try_from(i).ok().map(|i| (name.to_string(), i));
                    p.committed_offset =
                        key.as_ref().and_then(|k| committed.get(k)).map_or(-1, |o| *o as i64);
                    let metadata =
                        key.as_ref().zip(group.as_ref()).and_then(|(k, g)| g.offset_metadata.get(k));
                    p.metadata = Some(metadata.map_or_else(StrBytes::default, |m| s(m.clone())));
                    p
                })
                .collect();
            t.name = name;
            t
        })
        .collect();
    out
}

pub fn list_groups(
    broker: &BrokerState,
    caller: &Caller,
    groups: &KafkaGroups,
    req: ListGroupsRequest,
) -> ListGroupsResponse {
    let mut out = ListGroupsResponse::default();
    let view = broker.meta.view();
    let mut names: std::collections::BTreeSet<String> = view.state.groups.keys().cloned().collect();
    names.extend(groups.names());
    for name in names.into_iter().filter(|n| caller.allows(Operation::Describe, ResourceType::Group, n)) {
        let (state, protocol_type) = match groups.describe(&name) {
            Some(d) => (d.state.as_str(), d.protocol_type),
            None => ("Empty", "consumer".to_owned()),
        };
        if !req.states_filter.is_empty() && !req.states_filter.iter().any(|f| f.as_str() == state) {
            continue;
        }
        let mut g = ListedGroup::default();
        g.group_id = GroupId(s(name));
        g.protocol_type = s(protocol_type);
        g.group_state = s(state);
        out.groups.push(g);
    }
    out
}

pub fn describe_groups(
    broker: &BrokerState,
    caller: &Caller,
    groups: &KafkaGroups,
    req: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let view = broker.meta.view();
    let mut out = DescribeGroupsResponse::default();
    for name in req.groups {
        let mut g = DescribedGroup::default();
        match groups.describe(&name) {
            _ if !caller.allows(Operation::Describe, ResourceType::Group, name.as_str()) => {
                g.error_code = codes::GROUP_AUTHORIZATION_FAILED;
            }
            Some(d) => {
                g.group_state = s(d.state.as_str());
                g.protocol_type = s(d.protocol_type);
                g.protocol_data = s(d.protocol);
                g.members = d
                    .members
                    .into_iter()
                    .map(
                        |(id, client_id, host, metadata, assignment): (
                            String,
                            String,
                            String,
                            Bytes,
                            Bytes,
                        )| {
                            let mut m = DescribedGroupMember::default();
                            m.member_id = s(id);
                            m.client_id = s(client_id);
                            m.client_host = s(host);
                            m.member_metadata = metadata;
                            m.member_assignment = assignment;
                            m
                        },
                    )
                    .collect();
            }
            // Offsets only: an empty group. Kafka answers "Dead" for one it does not know.
            None if view.state.groups.contains_key(name.as_str()) => {
                g.group_state = s("Empty");
                g.protocol_type = s("consumer");
            }
            None => g.group_state = s("Dead"),
        }
        g.group_id = name;
        out.groups.push(g);
    }
    out
}
