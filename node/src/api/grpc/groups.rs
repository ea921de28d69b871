//! `eddy.v1.Groups`: consumer groups. Validates at the boundary, sends joins, heartbeats,
//! commits and resets to the coordinator (the metadata leader) through the metadata handle,
//! and answers reads from this node's replica of the metadata.

use std::collections::BTreeSet;
use std::sync::Arc;

use eddy_proto::v1 as pb;
use eddy_proto::v1::groups_server::Groups;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::error::BrokerError;
use crate::limits;
use crate::meta::MetaCommand;
use crate::meta::MetaReply;
use crate::meta::groups::Assignment;
use crate::meta::groups::Assignor;
use crate::meta::groups::GroupRecord;
use crate::meta::groups::TopicPartition;
use crate::service::BrokerState;
use crate::service::META_WRITE_TIMEOUT;

const DEFAULT_SESSION_TIMEOUT_MS: u32 = 10_000;
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

    async fn write(&self, cmd: MetaCommand) -> Result<MetaReply, BrokerError> {
        self.state.meta.write(cmd, META_WRITE_TIMEOUT).await
    }

    fn group(&self, name: &str) -> Result<GroupRecord, BrokerError> {
        self.state
            .meta
            .view()
            .state
            .groups
            .get(name)
            .map(|g| GroupRecord::clone(g))
            .ok_or_else(|| BrokerError::UnknownGroup(name.to_owned()))
    }
}

fn assignment_reply(r: MetaReply) -> Result<pb::GroupAssignment, BrokerError> {
    match r {
        MetaReply::Assignment(a) => Ok(to_pb_assignment(a)),
        other => Err(BrokerError::Internal(format!("unexpected reply to a group request: {other:?}"))),
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

fn group_state(g: &GroupRecord) -> &'static str {
    if g.members.is_empty() {
        "empty"
    } else if g.rebalancing() {
        "rebalancing"
    } else {
        "stable"
    }
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn join_group(
        &self,
        request: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::GroupAssignment>, Status> {
        let req = request.into_inner();
        group_name(&req.group)?;
        if req.topics.is_empty() {
            return Err(BrokerError::InvalidArgument("topics: subscribe to at least one topic".into()).into());
        }
        for t in &req.topics {
            limits::validate_topic_name("topics", t)?;
        }
        let assignor = Assignor::parse(&req.assignor).ok_or_else(|| {
            BrokerError::InvalidArgument(format!(
                "assignor: {:?} is not one of cooperative-sticky, range, round-robin",
                req.assignor
            ))
        })?;
        let session_timeout_ms =
            if req.session_timeout_ms == 0 { DEFAULT_SESSION_TIMEOUT_MS } else { req.session_timeout_ms };
        let topics: Vec<String> = req.topics.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        let r = self
            .write(MetaCommand::JoinGroup { group: req.group.clone(), topics, session_timeout_ms, assignor })
            .await?;
        let a = assignment_reply(r)?;
        self.state.meta.liveness().touch(&req.group, &a.member_id);
        Ok(Response::new(a))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::GroupAssignment>, Status> {
        let req = request.into_inner();
        group_name(&req.group)?;
        member_id("member_id", &req.member_id)?;
        let owned = from_pb_tps("owned", req.owned)?;
        let r = self
            .state
            .meta
            .heartbeat(req.group, req.member_id, req.generation, owned, META_WRITE_TIMEOUT)
            .await?;
        Ok(Response::new(assignment_reply(r)?))
    }

    async fn leave_group(
        &self,
        request: Request<pb::LeaveGroupRequest>,
    ) -> Result<Response<pb::LeaveGroupResponse>, Status> {
        let req = request.into_inner();
        group_name(&req.group)?;
        member_id("member_id", &req.member_id)?;
        self.write(MetaCommand::LeaveGroup { group: req.group, member: req.member_id }).await?;
        Ok(Response::new(pb::LeaveGroupResponse {}))
    }

    async fn commit_offsets(
        &self,
        request: Request<pb::CommitOffsetsRequest>,
    ) -> Result<Response<pb::CommitOffsetsResponse>, Status> {
        let req = request.into_inner();
        group_name(&req.group)?;
        let offsets = from_pb_offsets(req.offsets)?;
        if offsets.is_empty() {
            return Err(BrokerError::InvalidArgument("offsets: give at least one".into()).into());
        }
        let member = (!req.member_id.is_empty()).then_some(req.member_id);
        self.write(MetaCommand::CommitOffsets { group: req.group, member, offsets }).await?;
        Ok(Response::new(pb::CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<pb::FetchOffsetsRequest>,
    ) -> Result<Response<pb::FetchOffsetsResponse>, Status> {
        let req = request.into_inner();
        group_name(&req.group)?;
        let topics: BTreeSet<String> = req.topics.into_iter().collect();
        // A group that never committed has no offsets: that is an empty answer, not an error.
        let view = if req.linearizable {
            self.state.meta.linearizable_view(META_WRITE_TIMEOUT).await?
        } else {
            self.state.meta.view()
        };
        let offsets = view
            .state
            .groups
            .get(&req.group)
            .map(|g| {
                g.offsets
                    .iter()
                    .filter(|((t, _), _)| topics.is_empty() || topics.contains(t))
                    .map(|((topic, partition), offset)| pb::PartitionOffset {
                        topic: topic.clone(),
                        partition: *partition,
                        offset: *offset,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(pb::FetchOffsetsResponse { offsets }))
    }

    async fn list_groups(
        &self,
        _request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let view = self.state.meta.view();
        let groups = view
            .state
            .groups
            .iter()
            .map(|(name, g)| pb::GroupSummary {
                name: name.clone(),
                members: g.members.len() as u32,
                assignor: g.assignor.as_str().into(),
                generation: g.generation,
                state: group_state(g).into(),
            })
            .collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let req = request.into_inner();
        group_name(&req.group)?;
        let g = self.group(&req.group)?;
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
        // Every partition of a subscribed topic, and every partition with a committed offset.
        let view = self.state.meta.view();
        let mut tps: BTreeSet<TopicPartition> = g.offsets.keys().cloned().collect();
        for t in g.members.values().flat_map(|m| m.topics.iter()) {
            if let Some(rec) = view.state.topics.get(t) {
                tps.extend((0..rec.partitions.len() as u32).map(|p| (t.clone(), p)));
            }
        }
        let status = self.state.cluster_status().await;
        let merged = &status.partitions;
        let partitions = tps
            .into_iter()
            .map(|(topic, partition)| {
                let progress = view
                    .state
                    .topics
                    .get(&topic)
                    .and_then(|t| t.partitions.get(partition as usize))
                    .and_then(|p| merged.get(&p.group_id))
                    .cloned()
                    .unwrap_or_default();
                let committed = g.offsets.get(&(topic.clone(), partition)).copied();
                let lag = progress.hw.saturating_sub(committed.unwrap_or(progress.log_start));
                pb::GroupPartition {
                    topic,
                    partition,
                    committed,
                    high_watermark: progress.hw,
                    lag,
                    log_start_offset: progress.log_start,
                }
            })
            .collect();
        Ok(Response::new(pb::DescribeGroupResponse {
            group: req.group,
            assignor: g.assignor.as_str().into(),
            generation: g.generation,
            state: group_state(&g).into(),
            members,
            partitions,
        }))
    }

    async fn reset_offsets(
        &self,
        request: Request<pb::ResetOffsetsRequest>,
    ) -> Result<Response<pb::ResetOffsetsResponse>, Status> {
        let req = request.into_inner();
        group_name(&req.group)?;
        let offsets = from_pb_offsets(req.offsets)?;
        if offsets.is_empty() {
            return Err(BrokerError::InvalidArgument("offsets: give at least one".into()).into());
        }
        self.write(MetaCommand::ResetOffsets { group: req.group, offsets }).await?;
        Ok(Response::new(pb::ResetOffsetsResponse {}))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let req = request.into_inner();
        group_name(&req.group)?;
        self.write(MetaCommand::DeleteGroup { group: req.group }).await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }
}
