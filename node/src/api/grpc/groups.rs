//! `eddy.v1.Groups`: consumer groups. Validates the wire fields and calls the group service
//! (`crate::service::groups`).

use std::collections::BTreeSet;
use std::sync::Arc;

use eddy_proto::v1 as pb;
use eddy_proto::v1::groups_server::Groups;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::security::Caller;
use crate::security::acl::Operation;
use crate::security::acl::ResourceType;

use crate::error::BrokerError;
use crate::limits;
use crate::meta::groups::Assignment;
use crate::meta::groups::Assignor;
use crate::meta::groups::TopicPartition;
use crate::service::BrokerState;
use crate::service::groups::group_state;
/// Members heartbeat this often while partitions move, so that a rebalance completes quickly.
const REBALANCE_HEARTBEAT_MS: u32 = 100;
const HEARTBEAT_MS_MAX: u32 = 1_000;

pub struct GroupsService {
    state: Arc<BrokerState>,
}

impl GroupsService {
    pub fn new(state: Arc<BrokerState>) -> Self {
        Self { state }
    }
}

fn to_pb_assignment(a: Assignment) -> pb::GroupAssignment {
    let interval = if a.rebalancing {
        REBALANCE_HEARTBEAT_MS
    } else {
        (a.session_timeout_ms / 3).clamp(REBALANCE_HEARTBEAT_MS, HEARTBEAT_MS_MAX)
    };
    pb::GroupAssignment {
        member_id: a.member_id,
        generation: a.generation,
        assigned: a.assigned.into_iter().map(to_pb_tp).collect(),
        rebalancing: a.rebalancing,
        heartbeat_interval_ms: interval,
        session_timeout_ms: a.session_timeout_ms,
    }
}

fn to_pb_tp((topic, partition): TopicPartition) -> pb::TopicPartition {
    pb::TopicPartition { topic, partition }
}

fn group_name(name: &str) -> Result<(), BrokerError> {
    limits::validate_topic_name("group", name)
}

fn member_id(field: &str, id: &str) -> Result<(), BrokerError> {
    if id.is_empty() {
        return Err(BrokerError::InvalidArgument(format!("{field}: must not be empty")));
    }
    Ok(())
}

fn from_pb_tps(field: &str, tps: Vec<pb::TopicPartition>) -> Result<Vec<TopicPartition>, BrokerError> {
    tps.into_iter()
        .map(|tp| {
            limits::validate_topic_name(&format!("{field}.topic"), &tp.topic)?;
            Ok((tp.topic, tp.partition))
        })
        .collect()
}

fn from_pb_offsets(offsets: Vec<pb::PartitionOffset>) -> Result<Vec<(TopicPartition, u64)>, BrokerError> {
    let mut seen = BTreeSet::new();
    offsets
        .into_iter()
        .map(|o| {
            limits::validate_topic_name("offsets.topic", &o.topic)?;
            if !seen.insert((o.topic.clone(), o.partition)) {
                return Err(BrokerError::InvalidArgument(format!(
                    "offsets: {}/{} appears twice",
                    o.topic, o.partition
                )));
            }
            Ok(((o.topic, o.partition), o.offset))
        })
        .collect()
}

/// Committing or resetting offsets: read on the group and on every topic named (Kafka's rule for
/// OffsetCommit).
fn check_group_and_topics(
    caller: &Caller,
    group: &str,
    offsets: &[(crate::meta::groups::TopicPartition, u64)],
) -> Result<(), BrokerError> {
    caller.check(Operation::Read, ResourceType::Group, group)?;
    let topics: BTreeSet<&str> = offsets.iter().map(|((t, _), _)| t.as_str()).collect();
    topics.into_iter().try_for_each(|t| caller.check(Operation::Read, ResourceType::Topic, t))
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn join_group(
        &self,
        request: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::GroupAssignment>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        group_name(&req.group)?;
        caller.check(Operation::Read, ResourceType::Group, &req.group)?;
        for t in &req.topics {
            limits::validate_topic_name("topics", t)?;
            caller.check(Operation::Describe, ResourceType::Topic, t)?;
        }
        let assignor = Assignor::parse(&req.assignor).ok_or_else(|| {
            BrokerError::InvalidArgument(format!(
                "assignor: {:?} is not one of cooperative-sticky, range, round-robin",
                req.assignor
            ))
        })?;
        let topics: BTreeSet<String> = req.topics.into_iter().collect();
        let a = self.state.join_group(&req.group, topics, assignor, req.session_timeout_ms).await?;
        Ok(Response::new(to_pb_assignment(a)))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::GroupAssignment>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        group_name(&req.group)?;
        caller.check(Operation::Read, ResourceType::Group, &req.group)?;
        member_id("member_id", &req.member_id)?;
        let owned = from_pb_tps("owned", req.owned)?;
        let a = self.state.group_heartbeat(req.group, req.member_id, req.generation, owned).await?;
        Ok(Response::new(to_pb_assignment(a)))
    }

    async fn leave_group(
        &self,
        request: Request<pb::LeaveGroupRequest>,
    ) -> Result<Response<pb::LeaveGroupResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        group_name(&req.group)?;
        caller.check(Operation::Read, ResourceType::Group, &req.group)?;
        member_id("member_id", &req.member_id)?;
        self.state.leave_group(req.group, req.member_id).await?;
        Ok(Response::new(pb::LeaveGroupResponse {}))
    }

    async fn commit_offsets(
        &self,
        request: Request<pb::CommitOffsetsRequest>,
    ) -> Result<Response<pb::CommitOffsetsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        group_name(&req.group)?;
        let offsets = from_pb_offsets(req.offsets)?;
        check_group_and_topics(&caller, &req.group, &offsets)?;
        let member = (!req.member_id.is_empty()).then_some(req.member_id);
        self.state.commit_offsets(req.group, member, offsets).await?;
        Ok(Response::new(pb::CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<pb::FetchOffsetsRequest>,
    ) -> Result<Response<pb::FetchOffsetsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        group_name(&req.group)?;
        caller.check(Operation::Describe, ResourceType::Group, &req.group)?;
        let topics: BTreeSet<String> = req.topics.into_iter().collect();
        let offsets = self
            .state
            .committed_offsets(&req.group, &topics, req.linearizable)
            .await?
            .into_iter()
            .filter(|((topic, _), _)| caller.allows(Operation::Describe, ResourceType::Topic, topic))
            .map(|((topic, partition), offset)| pb::PartitionOffset { topic, partition, offset })
            .collect();
        Ok(Response::new(pb::FetchOffsetsResponse { offsets }))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let groups = self
            .state
            .list_groups()
            .into_iter()
            .filter(|(name, _)| caller.allows(Operation::Describe, ResourceType::Group, name))
            .map(|(name, g)| pb::GroupSummary {
                name,
                members: g.members.len() as u32,
                assignor: g.assignor.as_str().into(),
                generation: g.generation,
                state: group_state(&g).into(),
            })
            .collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        group_name(&req.group)?;
        caller.check(Operation::Describe, ResourceType::Group, &req.group)?;
        let d = self.state.describe_group(&req.group).await?;
        let g = &d.record;
        let members = g
            .members
            .iter()
            .map(|(id, m)| pb::GroupMember {
                id: id.clone(),
                partitions: g.assigned(id).into_iter().map(to_pb_tp).collect(),
                topics: m.topics.iter().cloned().collect(),
                session_timeout_ms: m.session_timeout_ms,
            })
            .collect();
        let partitions = d
            .partitions
            .into_iter()
            .filter(|p| caller.allows(Operation::Describe, ResourceType::Topic, &p.tp.0))
            .map(|p| pb::GroupPartition {
                topic: p.tp.0,
                partition: p.tp.1,
                committed: p.committed,
                high_watermark: p.high_watermark,
                lag: p.lag,
                log_start_offset: p.log_start_offset,
            })
            .collect();
        Ok(Response::new(pb::DescribeGroupResponse {
            group: req.group,
            assignor: g.assignor.as_str().into(),
            generation: g.generation,
            state: group_state(g).into(),
            members,
            partitions,
        }))
    }

    async fn reset_offsets(
        &self,
        request: Request<pb::ResetOffsetsRequest>,
    ) -> Result<Response<pb::ResetOffsetsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        group_name(&req.group)?;
        let offsets = from_pb_offsets(req.offsets)?;
        check_group_and_topics(&caller, &req.group, &offsets)?;
        self.state.reset_offsets(req.group, offsets).await?;
        Ok(Response::new(pb::ResetOffsetsResponse {}))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        group_name(&req.group)?;
        caller.check(Operation::Delete, ResourceType::Group, &req.group)?;
        self.state.delete_group(req.group).await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }
}
