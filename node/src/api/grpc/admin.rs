//! `eddy.v1.Admin`: operating the cluster (nodes, leadership, moves, topics, health). Every
//! call can go to any node; changes go through the metadata group, and the reconcilers on the
//! partition leaders carry them out.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use eddy_proto::v1 as pb;
use eddy_proto::v1::admin_client::AdminClient;
use eddy_proto::v1::admin_server::Admin;
use eddy_raft::NodeAddr;
use eddy_raft::NodeId;
use futures::future::join_all;
use openraft::async_runtime::WatchReceiver;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::control::reconciler::Reconciler;
use crate::error::BrokerError;
use crate::limits;
use crate::meta::MetaCommand;
use crate::meta::MetaReply;
use crate::meta::sm::MetaView;
use crate::meta::state::NodeState;
use crate::security::Caller;
use crate::security::acl::AclBinding;
use crate::security::acl::Operation;
use crate::security::acl::Principal;
use crate::security::acl::ResourceType;
use crate::security::users::UserRecord;
use crate::service::BrokerState;
use crate::service::META_WRITE_TIMEOUT;
use crate::status::STATUS_TIMEOUT;

/// How long a leadership transfer may take before the caller is told it did not complete.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AdminService {
    state: Arc<BrokerState>,
    reconciler: Arc<Reconciler>,
}

/// How long a node listing waits to confirm this node's metadata is current: a member applies
/// the leader's read index within milliseconds; a node that does not within this answers
/// UNAVAILABLE, so that the client asks the next node well within its own deadline.
const LIST_CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);

impl AdminService {
    pub fn new(state: Arc<BrokerState>, reconciler: Arc<Reconciler>) -> Self {
        Self { state, reconciler }
    }

    async fn write(&self, cmd: MetaCommand) -> Result<MetaReply, BrokerError> {
        self.state.meta.write(cmd, META_WRITE_TIMEOUT).await
    }

    async fn node_summaries(&self) -> (Vec<pb::NodeSummary>, Option<NodeId>) {
        self.summaries_of(&self.state.meta.view()).await
    }

    async fn summaries_of(&self, view: &MetaView) -> (Vec<pb::NodeSummary>, Option<NodeId>) {
        let status = self.state.cluster_status().await;
        let leaders = status.leader_counts();
        let replicas = view.state.replica_counts();
        let voters = self.state.meta.voters();
        let nodes = view
            .state
            .nodes
            .iter()
            .map(|(id, n)| pb::NodeSummary {
                id: *id,
                state: n.state.as_str().to_owned(),
                client_addr: n.addr.client_addr.clone(),
                raft_addr: n.addr.raft_addr.clone(),
                leaders: leaders.get(id).copied().unwrap_or(0),
                replicas: replicas.get(id).copied().unwrap_or(0),
                up: status.answered.contains_key(id),
                metadata_voter: voters.contains(id),
                kafka_addr: n.kafka_addr.clone(),
                rack: n.rack.clone(),
            })
            .collect();
        (nodes, self.state.meta.leader())
    }
}

fn parse_state(s: &str) -> Result<NodeState, BrokerError> {
    match NodeState::parse(s) {
        Some(NodeState::Removed) | None => Err(BrokerError::InvalidArgument(format!(
            "state: {s:?} is not one of active, draining, decommissioning"
        ))),
        Some(st) => Ok(st),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn transfer_leadership(
        &self,
        request: Request<pb::TransferLeadershipRequest>,
    ) -> Result<Response<pb::TransferLeadershipResponse>, Status> {
        let req = request.into_inner();
        limits::validate_topic_name("topic", &req.topic)?;
        let (topic, p) = self.state.partition(&req.topic, req.partition)?;
        let what = format!("{}/{}", topic.name, req.partition);
        if !p.desired().contains(&req.to_node) {
            return Err(BrokerError::InvalidArgument(format!(
                "to_node: node {} holds no replica of {what} (replicas: {:?})",
                req.to_node,
                p.desired()
            ))
            .into());
        }
        let view = self.state.meta.view();
        if let Some(n) = view.state.nodes.get(&req.to_node)
            && !n.state.may_lead()
        {
            return Err(BrokerError::InvalidArgument(format!(
                "to_node: node {} is {} and may not lead; undrain it first",
                req.to_node,
                n.state.as_str()
            ))
            .into());
        }
        if self.reconciler.liveness.replica_damaged(p.group_id, req.to_node) {
            return Err(BrokerError::InvalidArgument(format!(
                "to_node: node {}'s replica of {what} is damaged and will not start; move it to another node first",
                req.to_node
            ))
            .into());
        }
        let Some(h) = self.state.replicas.get(p.group_id) else {
            return Err(
                BrokerError::NotLeader { what, me: self.state.me, leader: None, leader_addr: None }.into()
            );
        };
        if p.desired().first() != Some(&req.to_node) {
            // Recorded first, so that leadership balancing keeps the leader where it is sent.
            let cmd = MetaCommand::SetPreferredLeader {
                topic: req.topic,
                partition: req.partition,
                node: req.to_node,
            };
            self.write(cmd).await?;
        }
        let status = h.status();
        if status.leader == Some(req.to_node) {
            return Ok(Response::new(pb::TransferLeadershipResponse { leader: req.to_node }));
        }
        if !status.is_leader {
            return Err(h.not_leader(status.leader).into());
        }
        eddy_raft::liveness::transfer_leadership(
            h.raft(),
            p.group_id,
            req.to_node,
            &self.reconciler.liveness,
        )
        .await
        .map_err(|e| BrokerError::Unavailable(format!("{what}: {e}")))?;
        let mut metrics = h.raft().metrics();
        let wait = metrics.wait_until(|m| m.current_leader == Some(req.to_node));
        match tokio::time::timeout(TRANSFER_TIMEOUT, wait).await {
            Ok(Ok(_)) => Ok(Response::new(pb::TransferLeadershipResponse { leader: req.to_node })),
            _ => Err(BrokerError::Timeout(format!(
                "{what}: node {} did not take over within {TRANSFER_TIMEOUT:?} (is it in sync?); the leader is {:?}",
                req.to_node,
                h.raft().metrics().borrow_watched().current_leader
            ))
            .into()),
        }
    }

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        // As of a read index: operators switch a node off once this says `removed`, and a
        // node that was removed (or cut off) holds a view that stopped before that, and would
        // answer `decommissioning` for good (the jepsen runner waited on one for 120 s). Such
        // a node answers UNAVAILABLE, and the client asks the next node.
        let view = self.state.meta.confirmed_view(LIST_CONFIRM_TIMEOUT).await.map_err(|e| {
            Status::from(BrokerError::Unavailable(format!(
                "node {}'s metadata is not confirmed current ({e}); ask another node",
                self.state.me
            )))
        })?;
        let (nodes, metadata_leader) = self.summaries_of(&view).await;
        Ok(Response::new(pb::ListNodesResponse { nodes, metadata_leader }))
    }

    async fn set_node_state(
        &self,
        request: Request<pb::SetNodeStateRequest>,
    ) -> Result<Response<pb::SetNodeStateResponse>, Status> {
        let req = request.into_inner();
        let state = parse_state(&req.state)?;
        let reply = self.write(MetaCommand::SetNodeState { node: req.node_id, state }).await?;
        let moving = match reply {
            MetaReply::Moving(m) => m,
            _ => Vec::new(),
        };
        let (nodes, _) = self.node_summaries().await;
        let node = nodes.into_iter().find(|n| n.id == req.node_id);
        Ok(Response::new(pb::SetNodeStateResponse { node, moving }))
    }

    async fn cluster_health(
        &self,
        _: Request<pb::ClusterHealthRequest>,
    ) -> Result<Response<pb::ClusterHealthResponse>, Status> {
        let view = self.state.meta.view();
        let status = self.state.cluster_status().await;
        let mut problems = Vec::new();
        let mut partitions = 0;
        let mut not_preferred = 0;
        let mut moves = 0;
        for t in view.state.topics.values() {
            for (i, p) in t.partitions.iter().enumerate() {
                partitions += 1;
                if p.target.is_some() {
                    moves += 1;
                }
                let m = status.partitions.get(&p.group_id).cloned().unwrap_or_default();
                let desired = p.desired().to_vec();
                let problem = if m.reporters.is_disjoint(&desired.iter().copied().collect()) {
                    Some("offline")
                } else if !m.from_leader {
                    Some("leaderless")
                } else if desired.iter().any(|r| {
                    // A leader's view of an idle follower is as old as the last write: a node
                    // that answered but runs no replica of the group (a restart still opening
                    // its groups) is not in sync, whatever the leader last saw.
                    !m.in_sync.contains(r) || (status.answered.contains_key(r) && !m.reporters.contains(r))
                }) {
                    Some("under_replicated")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    problems.push(pb::PartitionProblem {
                        topic: t.name.clone(),
                        partition: i as u32,
                        problem: problem.to_owned(),
                        replicas: desired.clone(),
                        in_sync: m.in_sync.clone(),
                    });
                } else if m.leader != desired.first().copied() {
                    not_preferred += 1;
                }
            }
        }
        let live: BTreeSet<NodeId> = status.answered.keys().copied().collect();
        let nodes_down: Vec<NodeId> = view
            .state
            .nodes
            .iter()
            .filter(|(id, n)| n.state != NodeState::Removed && !live.contains(id))
            .map(|(id, _)| *id)
            .collect();
        let voters = self.state.meta.voters();
        let voters_up = voters.iter().filter(|v| live.contains(v)).count();
        let metadata_leader = self.state.meta.leader();
        let metadata_quorum = metadata_leader.is_some() && voters_up * 2 > voters.len();
        let healthy = metadata_quorum && problems.is_empty() && nodes_down.is_empty();
        Ok(Response::new(pb::ClusterHealthResponse {
            healthy,
            metadata_quorum,
            metadata_leader,
            nodes_down,
            problems,
            partitions,
            leaders_not_preferred: not_preferred,
            moves_in_progress: moves,
        }))
    }

    async fn balance_leaders(
        &self,
        _: Request<pb::BalanceLeadersRequest>,
    ) -> Result<Response<pb::BalanceLeadersResponse>, Status> {
        let view = self.state.meta.view();
        let calls = view.state.nodes.iter().filter(|(_, n)| n.state != NodeState::Removed).map(|(id, n)| {
            let (id, addr) = (*id, n.addr.client_addr.clone());
            async move {
                if id == self.state.me {
                    return self.reconciler.round(crate::control::reconciler::Balance::Now).await;
                }
                let mut client = AdminClient::new(self.state.client_peers.channel(id, &addr));
                let mut req = Request::new(pb::BalanceLeadersRequest {});
                req.set_timeout(STATUS_TIMEOUT * 4);
                match tokio::time::timeout(STATUS_TIMEOUT * 4, client.balance_local(req)).await {
                    Ok(Ok(r)) => r.into_inner().transfers,
                    _ => 0,
                }
            }
        });
        let transfers = join_all(calls).await.into_iter().sum();
        Ok(Response::new(pb::BalanceLeadersResponse { transfers }))
    }

    async fn balance_local(
        &self,
        _: Request<pb::BalanceLeadersRequest>,
    ) -> Result<Response<pb::BalanceLeadersResponse>, Status> {
        let transfers = self.reconciler.round(crate::control::reconciler::Balance::Now).await;
        Ok(Response::new(pb::BalanceLeadersResponse { transfers }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        caller.check(Operation::Delete, ResourceType::Topic, &req.name)?;
        self.state.delete_topic(&req.name).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn alter_topic_config(
        &self,
        request: Request<pb::AlterTopicConfigRequest>,
    ) -> Result<Response<pb::AlterTopicConfigResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        caller.check(Operation::Alter, ResourceType::Topic, &req.name)?;
        let config = self.state.alter_topic_config(&req.name, req.set.into_iter().collect()).await?;
        Ok(Response::new(pb::AlterTopicConfigResponse { config: config.into_iter().collect() }))
    }

    async fn add_partitions(
        &self,
        request: Request<pb::AddPartitionsRequest>,
    ) -> Result<Response<pb::AddPartitionsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        caller.check(Operation::Alter, ResourceType::Topic, &req.name)?;
        let partitions = self.state.add_partitions(&req.name, req.count).await?;
        Ok(Response::new(pb::AddPartitionsResponse { partitions }))
    }

    async fn move_partition(
        &self,
        request: Request<pb::MovePartitionRequest>,
    ) -> Result<Response<pb::MovePartitionResponse>, Status> {
        let req = request.into_inner();
        limits::validate_topic_name("topic", &req.topic)?;
        self.write(MetaCommand::MovePartition {
            topic: req.topic,
            partition: req.partition,
            replicas: req.replicas,
        })
        .await?;
        Ok(Response::new(pb::MovePartitionResponse {}))
    }

    async fn list_moves(
        &self,
        _: Request<pb::ListMovesRequest>,
    ) -> Result<Response<pb::ListMovesResponse>, Status> {
        let view = self.state.meta.serving_view().await?;
        let status = self.state.cluster_status().await;
        let mut moves = Vec::new();
        for t in view.state.topics.values() {
            for (i, p) in t.partitions.iter().enumerate() {
                let Some(to) = &p.target else { continue };
                let m = status.partitions.get(&p.group_id).cloned().unwrap_or_default();
                moves.push(pb::MoveStatus {
                    topic: t.name.clone(),
                    partition: i as u32,
                    from: p.replicas.clone(),
                    to: to.clone(),
                    voters: m.voters,
                    learners: m.learners,
                });
            }
        }
        Ok(Response::new(pb::ListMovesResponse { moves }))
    }

    async fn cancel_move(
        &self,
        request: Request<pb::CancelMoveRequest>,
    ) -> Result<Response<pb::CancelMoveResponse>, Status> {
        let req = request.into_inner();
        limits::validate_topic_name("topic", &req.topic)?;
        self.write(MetaCommand::CancelMove { topic: req.topic, partition: req.partition }).await?;
        Ok(Response::new(pb::CancelMoveResponse {}))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        if req.node_id == 0 {
            return Err(BrokerError::InvalidArgument("node_id: must be at least 1".into()).into());
        }
        if caller.restricted() && caller.principal != Principal::Node(req.node_id) {
            return Err(BrokerError::PermissionDenied(format!(
                "{} may not join the cluster as node {}: a node joins with its own node certificate",
                caller.principal, req.node_id
            ))
            .into());
        }
        if req.client_addr.is_empty() || req.raft_addr.is_empty() {
            return Err(BrokerError::InvalidArgument("client_addr, raft_addr: both are needed".into()).into());
        }
        let addr = NodeAddr { raft_addr: req.raft_addr, client_addr: req.client_addr };
        let voter = self.state.meta.join(req.node_id, addr, META_WRITE_TIMEOUT).await?;
        Ok(Response::new(pb::JoinResponse { voter }))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let req = request.into_inner();
        eddy_proto::credentials::validate_user_name(&req.name)
            .map_err(|e| BrokerError::InvalidArgument(format!("name: {e}")))?;
        let creds =
            req.credentials.ok_or_else(|| BrokerError::InvalidArgument("credentials: missing".into()))?;
        let record = UserRecord::from_proto(&creds).map_err(BrokerError::InvalidArgument)?;
        match self.write(MetaCommand::PutUser { name: req.name, record, replace: req.replace }).await? {
            MetaReply::Error(e) => Err(BrokerError::from(e).into()),
            _ => Ok(Response::new(pb::CreateUserResponse {})),
        }
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let req = request.into_inner();
        eddy_proto::credentials::validate_user_name(&req.name)
            .map_err(|e| BrokerError::InvalidArgument(format!("name: {e}")))?;
        let deleted = changed(self.write(MetaCommand::DeleteUser { name: req.name }).await?)?;
        Ok(Response::new(pb::DeleteUserResponse { deleted }))
    }

    async fn list_users(
        &self,
        _: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let users = self.state.meta.view().state.users.keys().cloned().collect();
        Ok(Response::new(pb::ListUsersResponse { users }))
    }

    async fn add_acl(
        &self,
        request: Request<pb::AclBinding>,
    ) -> Result<Response<pb::AddAclResponse>, Status> {
        let b = AclBinding::from_proto(request.get_ref()).map_err(BrokerError::InvalidArgument)?;
        let added = changed(self.write(MetaCommand::AddAcl(b)).await?)?;
        Ok(Response::new(pb::AddAclResponse { added }))
    }

    async fn remove_acl(
        &self,
        request: Request<pb::AclBinding>,
    ) -> Result<Response<pb::RemoveAclResponse>, Status> {
        let b = AclBinding::from_proto(request.get_ref()).map_err(BrokerError::InvalidArgument)?;
        let removed = changed(self.write(MetaCommand::RemoveAcl(b)).await?)?;
        Ok(Response::new(pb::RemoveAclResponse { removed }))
    }

    async fn list_acls(
        &self,
        _: Request<pb::ListAclsRequest>,
    ) -> Result<Response<pb::ListAclsResponse>, Status> {
        let bindings = self.state.meta.view().state.acls.iter().map(AclBinding::to_proto).collect();
        Ok(Response::new(pb::ListAclsResponse { bindings }))
    }

    async fn set_quota(&self, request: Request<pb::Quota>) -> Result<Response<pb::SetQuotaResponse>, Status> {
        let q = request.into_inner();
        if q.user != crate::security::quota::DEFAULT_USER {
            eddy_proto::credentials::validate_user_name(&q.user)
                .map_err(|e| BrokerError::InvalidArgument(format!("user: {e}")))?;
        }
        if q.producer_byte_rate == Some(0) || q.consumer_byte_rate == Some(0) {
            return Err(BrokerError::InvalidArgument(
                "a byte rate is at least 1; omit it for no limit".into(),
            )
            .into());
        }
        let quota = crate::security::quota::UserQuota {
            producer_byte_rate: q.producer_byte_rate,
            consumer_byte_rate: q.consumer_byte_rate,
        };
        match self.write(MetaCommand::SetQuota { user: q.user, quota }).await? {
            MetaReply::Error(e) => Err(BrokerError::from(e).into()),
            _ => Ok(Response::new(pb::SetQuotaResponse {})),
        }
    }

    async fn list_quotas(
        &self,
        _: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        let quotas = self
            .state
            .meta
            .view()
            .state
            .quotas
            .iter()
            .map(|(user, q)| pb::Quota {
                user: user.clone(),
                producer_byte_rate: q.producer_byte_rate,
                consumer_byte_rate: q.consumer_byte_rate,
            })
            .collect();
        Ok(Response::new(pb::ListQuotasResponse { quotas }))
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(pb::WhoAmIResponse {
            principal: caller.principal.to_string(),
            superuser: caller.superuser,
            authenticated_by: caller.via.as_str().to_owned(),
        }))
    }
}

/// The answer of a command that reports whether it changed anything.
fn changed(reply: MetaReply) -> Result<bool, BrokerError> {
    match reply {
        MetaReply::Changed(c) => Ok(c),
        MetaReply::Error(e) => Err(e.into()),
        other => Err(BrokerError::Internal(format!("unexpected metadata reply {other:?}"))),
    }
}
