//! [`MetaHandle`]: how the rest of the node reads and changes the metadata.
//!
//! Reads come from this node's replica (it may lag the leader briefly). Changes go through the
//! metadata leader: a node that is not the leader forwards the request over `ForwardMeta` to the
//! leader, which carries it out (a command is proposed to the group; a join changes the group's
//! membership) and returns the result.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eddy_proto::RAFT_WIRE_VERSION;
use eddy_proto::v1::RaftRequest;
use eddy_proto::v1::raft_client::RaftClient;
use eddy_raft::C;
use eddy_raft::META_GROUP;
use eddy_raft::NodeAddr;
use eddy_raft::NodeId;
use eddy_raft::Payload;
use eddy_raft::registry::MetaForwarder;
use eddy_raft::transport::Peers;
use futures::future::BoxFuture;
use openraft::ChangeMembers;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::ClientWriteError;
use openraft::errors::ForwardToLeader;
use openraft::errors::RaftError;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

use super::command::MetaCommand;
use super::command::MetaError;
use super::command::MetaReply;
use super::groups::TopicPartition;
use super::sm::MetaStateMachine;
use super::sm::MetaView;
use crate::control::coordinator::Liveness;
use crate::error::BrokerError;

pub type MetaRaft = openraft::Raft<C, MetaStateMachine>;

/// Pause before retrying while the metadata leader is unknown or changing.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// The metadata group keeps at most this many voters; further nodes are learners.
pub const META_VOTERS_MAX: usize = 5;

/// What a node asks of the metadata leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetaRequest {
    Command(MetaCommand),
    /// Add a node to the metadata group (as a voter while there are fewer than five).
    Join {
        id: NodeId,
        addr: NodeAddr,
    },
    /// Remove a node from the metadata group (after it was decommissioned).
    Leave {
        id: NodeId,
    },
    /// A consumer-group heartbeat, handled by the coordinator (the metadata leader).
    Heartbeat {
        group: String,
        member: String,
        generation: u64,
        owned: Vec<TopicPartition>,
    },
    /// The leader's read index: the log index up to which a node must have applied the
    /// metadata for its view to hold every change committed before the request (Raft §6.4).
    ReadIndex,
}

#[derive(Clone)]
pub struct MetaHandle {
    raft: MetaRaft,
    view: watch::Receiver<Arc<MetaView>>,
    peers: Arc<Peers>,
    me: NodeId,
    liveness: Arc<Liveness>,
    freshness: Arc<std::sync::Mutex<Freshness>>,
    /// Held by the one confirmation under way.
    confirming: Arc<tokio::sync::Mutex<()>>,
    /// The planted bug `stale-metadata-served`: [`Self::serving_view`] never confirms.
    #[cfg(feature = "planted-bugs")]
    pub trust_own_view: bool,
}

/// How stale a view this node serves to clients' questions about the cluster (topics,
/// placement, moves): it answers from its own view while that was confirmed current (a read
/// index, see [`MetaHandle::confirmed_view`]) at most this long ago. A node the cluster removed
/// (it hears no more of the metadata log, and its view stops where it left), or one cut off
/// from the metadata group's majority, then answers `UNAVAILABLE` and the client asks another
/// node. A few election timeouts: a metadata election alone does not stop clients finding
/// their partitions (the data path never needs the metadata group).
pub const SERVE_STALE_MAX: Duration = Duration::from_secs(5);
/// A view confirmed longer ago than this is confirmed again when a client asks (in the
/// background while it is still within [`SERVE_STALE_MAX`]); an idle node confirms nothing.
const RECONFIRM_AFTER: Duration = Duration::from_secs(1);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Freshness {
    /// When the last successful confirmation asked for its read index: the view has held
    /// every change committed before then ever since.
    confirmed_at: Option<Instant>,
    /// When the last confirmation failed, and why.
    failed: Option<(Instant, String)>,
}

enum Attempt {
    Done(MetaReply),
    Forward(NodeId, String),
    Retry(String),
}

/// A reply as a result: the state machine's refusals travel as [`MetaReply::Error`] (also on
/// the wire, when a request is forwarded to the leader) and become errors here, so that no
/// caller matches on them.
fn into_result(r: MetaReply) -> Result<MetaReply, BrokerError> {
    match r {
        MetaReply::Error(e) => Err(e.into()),
        r => Ok(r),
    }
}

fn forward_or_retry(me: NodeId, f: ForwardToLeader<C>) -> Attempt {
    match (f.leader_id, f.leader_node) {
        (Some(id), Some(node)) if id != me => Attempt::Forward(id, node.raft_addr),
        _ => Attempt::Retry("the metadata group has no leader yet".into()),
    }
}

impl MetaHandle {
    pub fn new(raft: MetaRaft, view: watch::Receiver<Arc<MetaView>>, peers: Arc<Peers>, me: NodeId) -> Self {
        Self {
            raft,
            view,
            peers,
            me,
            liveness: Arc::default(),
            freshness: Arc::default(),
            confirming: Arc::default(),
            #[cfg(feature = "planted-bugs")]
            trust_own_view: false,
        }
    }

    /// The coordinator's record of consumer heartbeats.
    pub fn liveness(&self) -> &Arc<Liveness> {
        &self.liveness
    }

    pub fn raft(&self) -> &MetaRaft {
        &self.raft
    }

    /// The latest metadata this node has applied.
    pub fn view(&self) -> Arc<MetaView> {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<MetaView>> {
        self.view.clone()
    }

    /// The metadata as of a linearizable read: this node must be the leader, and confirms it
    /// with a quorum (read index) and applies up to the read point before answering. A follower
    /// answers `NotLeader`, naming the leader, so the client asks there.
    pub async fn linearizable_view(&self, timeout: Duration) -> Result<Arc<MetaView>, BrokerError> {
        use openraft::ReadPolicy;
        use openraft::errors::LinearizableReadError;
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Err(_) => {
                Err(BrokerError::Unavailable(format!("metadata read not confirmed within {timeout:?}")))
            }
            Ok(Ok(_)) => Ok(self.view()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                let view = self.view();
                Err(BrokerError::NotLeader {
                    what: "the metadata group".into(),
                    me: self.me,
                    leader: f.leader_id,
                    leader_addr: f
                        .leader_id
                        .and_then(|l| view.state.nodes.get(&l))
                        .map(|n| n.addr.client_addr.clone()),
                })
            }
            Ok(Err(e)) => Err(BrokerError::Unavailable(format!("metadata read failed: {e}"))),
        }
    }

    /// The metadata leader as this node knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// The metadata group's voters as this node knows them.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.raft.metrics().borrow_watched().membership_config.membership().voter_ids().collect()
    }

    /// True once this node knows a metadata leader and has applied its log.
    pub fn is_ready(&self) -> bool {
        let m = self.raft.metrics().borrow_watched().clone();
        m.current_leader.is_some() && m.last_applied.is_some()
    }

    async fn attempt_local(&self, req: &MetaRequest) -> Attempt {
        match req {
            MetaRequest::Command(cmd) => self.propose(cmd).await,
            MetaRequest::Join { id, addr } => self.join_local(*id, addr.clone()).await,
            MetaRequest::Heartbeat { group, member, generation, owned } => {
                self.heartbeat_local(group, member, *generation, owned).await
            }
            MetaRequest::ReadIndex => {
                use openraft::ReadPolicy;
                use openraft::errors::LinearizableReadError;
                match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                    Ok(read) => Attempt::Done(MetaReply::ReadIndex(read.log_id().index)),
                    Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                        forward_or_retry(self.me, f)
                    }
                    Err(e) => Attempt::Retry(format!("metadata read failed: {e}")),
                }
            }
            MetaRequest::Leave { id } => {
                let m = self.raft.metrics().borrow_watched().membership_config.membership().clone();
                if !m.nodes().any(|(n, _)| n == id) {
                    return Attempt::Done(MetaReply::Done);
                }
                let change = ChangeMembers::RemoveNodes(BTreeSet::from([*id]));
                let change = if m.voter_ids().any(|v| v == *id) {
                    ChangeMembers::RemoveVoters(BTreeSet::from([*id]))
                } else {
                    change
                };
                match self.raft.change_membership(change, false).await {
                    Ok(_) => Attempt::Done(MetaReply::Done),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                        forward_or_retry(self.me, f)
                    }
                    Err(e) => {
                        Attempt::Retry(format!("removing node {id} from the metadata group failed: {e}"))
                    }
                }
            }
        }
    }

    /// Serves a heartbeat on the coordinator: notes that the member is alive, and proposes its
    /// report only when it changes what the state machine knows.
    async fn heartbeat_local(
        &self,
        group: &str,
        member: &str,
        generation: u64,
        owned: &[TopicPartition],
    ) -> Attempt {
        let m = self.raft.metrics().borrow_watched().clone();
        match m.current_leader {
            Some(l) if l == self.me => {}
            Some(l) => match m.membership_config.membership().get_node(&l) {
                Some(node) => return Attempt::Forward(l, node.raft_addr.clone()),
                None => return Attempt::Retry(format!("metadata leader {l} has no known address")),
            },
            None => return Attempt::Retry("the metadata group has no leader yet".into()),
        }
        self.liveness.touch(group, member);
        let view = self.view();
        let Some(g) = view.state.groups.get(group) else {
            return Attempt::Done(MetaReply::Error(MetaError::UnknownGroup(group.to_owned())));
        };
        let reported: BTreeSet<TopicPartition> = owned.iter().cloned().collect();
        let unchanged = g.members.get(member).is_some_and(|rec| {
            rec.owned == reported
                && !(g.assignor.is_eager()
                    && generation == g.generation
                    && reported.is_empty()
                    && rec.synced_generation != g.generation)
        });
        if unchanged && let Some(a) = g.assignment(member) {
            return Attempt::Done(MetaReply::Assignment(a));
        }
        let cmd = MetaCommand::GroupHeartbeat {
            group: group.to_owned(),
            member: member.to_owned(),
            generation,
            owned: owned.to_vec(),
        };
        self.propose(&cmd).await
    }

    async fn propose(&self, cmd: &MetaCommand) -> Attempt {
        match self.raft.client_write(Payload(cmd.encode())).await {
            Ok(resp) => {
                Attempt::Done(MetaReply::decode(&resp.data.0).unwrap_or_else(|e| {
                    MetaReply::Error(MetaError::Invalid(format!("undecodable reply: {e}")))
                }))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => forward_or_retry(self.me, f),
            Err(e) => Attempt::Retry(format!("metadata write failed: {e}")),
        }
    }

    /// Adds `id` as a learner (waiting until it caught up), then as a voter while the group has
    /// fewer than [`META_VOTERS_MAX`].
    async fn join_local(&self, id: NodeId, addr: NodeAddr) -> Attempt {
        let m = self.raft.metrics().borrow_watched().membership_config.membership().clone();
        if let Some((_, known)) = m.nodes().find(|(n, _)| **n == id)
            && *known != addr
        {
            return Attempt::Done(MetaReply::Error(MetaError::Conflict(format!(
                "node id {id} is already a member with other addresses ({known}); every node needs its own id"
            ))));
        }
        let voters: BTreeSet<NodeId> = m.voter_ids().collect();
        if voters.contains(&id) {
            return Attempt::Done(MetaReply::Joined { voter: true });
        }
        if let Err(e) = self.raft.add_learner(id, addr, true).await {
            return match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => forward_or_retry(self.me, f),
                e => Attempt::Retry(format!("adding node {id} as a learner failed: {e}")),
            };
        }
        if voters.len() >= META_VOTERS_MAX {
            return Attempt::Done(MetaReply::Joined { voter: false });
        }
        match self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await {
            Ok(_) => Attempt::Done(MetaReply::Joined { voter: true }),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => forward_or_retry(self.me, f),
            Err(e) => Attempt::Retry(format!("making node {id} a voter failed: {e}")),
        }
    }

    /// Carries out `req` on the metadata leader; retries through leader changes until `timeout`.
    /// The state machine's refusals come back as errors.
    async fn request(&self, req: MetaRequest, timeout: Duration) -> Result<MetaReply, BrokerError> {
        let deadline = Instant::now() + timeout;
        let payload: Bytes = postcard::to_stdvec(&req).expect("metadata requests always encode").into();
        let mut last = String::from("no attempt made");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(BrokerError::Timeout(format!(
                    "metadata change not confirmed within {timeout:?} ({last}); it may or may not have been applied"
                )));
            }
            match tokio::time::timeout(remaining, self.attempt_local(&req)).await {
                Err(_) => last = "timed out waiting for the metadata group".into(),
                Ok(Attempt::Done(r)) => return into_result(r),
                Ok(Attempt::Retry(why)) => last = why,
                Ok(Attempt::Forward(leader, addr)) => {
                    match self.forward(leader, &addr, payload.clone(), remaining).await {
                        Ok(r) => return into_result(r),
                        // A joiner that asked a node the leader refuses (one removed from the
                        // cluster but still running, whose view may not say so yet) hears it
                        // at once and asks its next join address, instead of after `timeout`
                        // (seed 803). Other requests keep retrying: a node the leader's view
                        // does not list yet is refused only until it is vouched for.
                        Err(status)
                            if status.code() == tonic::Code::PermissionDenied
                                && matches!(req, MetaRequest::Join { .. }) =>
                        {
                            return Err(BrokerError::Unavailable(format!(
                                "node {} cannot add a node: the metadata leader {leader} refused it: {}",
                                self.me,
                                status.message()
                            )));
                        }
                        Err(status) => {
                            last =
                                format!("forwarding to metadata leader {leader} failed: {}", status.message())
                        }
                    }
                }
            }
            tokio::time::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// Proposes `cmd` to the metadata group and returns the state machine's reply.
    pub async fn write(&self, cmd: MetaCommand, timeout: Duration) -> Result<MetaReply, BrokerError> {
        self.request(MetaRequest::Command(cmd), timeout).await
    }

    /// Makes `id` a member of the metadata group; returns whether it is a voter.
    pub async fn join(&self, id: NodeId, addr: NodeAddr, timeout: Duration) -> Result<bool, BrokerError> {
        match self.request(MetaRequest::Join { id, addr }, timeout).await? {
            MetaReply::Joined { voter } => Ok(voter),
            other => Err(BrokerError::Internal(format!("unexpected reply to a join: {other:?}"))),
        }
    }

    /// Sends a consumer-group heartbeat to the coordinator.
    pub async fn heartbeat(
        &self,
        group: String,
        member: String,
        generation: u64,
        owned: Vec<TopicPartition>,
        timeout: Duration,
    ) -> Result<MetaReply, BrokerError> {
        self.request(MetaRequest::Heartbeat { group, member, generation, owned }, timeout).await
    }

    /// This node's metadata view once it holds every change committed before the call, on any
    /// node (a follower asks the leader for its read index and waits to have applied up to it):
    /// what a decision that must not act on a stale view, such as deleting a replica, reads.
    pub async fn confirmed_view(&self, timeout: Duration) -> Result<Arc<MetaView>, BrokerError> {
        let deadline = Instant::now() + timeout;
        let index = match self.request(MetaRequest::ReadIndex, timeout).await? {
            MetaReply::ReadIndex(i) => i,
            other => {
                return Err(BrokerError::Internal(format!("unexpected reply to a read index: {other:?}")));
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        match self.raft.wait(Some(remaining)).applied_index_at_least(Some(index), "the read index").await {
            Ok(_) => Ok(self.view()),
            Err(e) => Err(BrokerError::Unavailable(format!(
                "metadata not applied up to the leader's read index {index} within {timeout:?}: {e}"
            ))),
        }
    }

    /// The view to answer a client's question about the cluster with: this node's own, if it
    /// was confirmed current within [`SERVE_STALE_MAX`] (confirmed again in the background, once
    /// a second at most, while clients ask); else confirmed now (one confirmation at a time:
    /// callers that waited on a failed one share its failure), or `UNAVAILABLE`, naming how
    /// stale it is.
    pub async fn serving_view(&self) -> Result<Arc<MetaView>, BrokerError> {
        #[cfg(feature = "planted-bugs")]
        if self.trust_own_view {
            return Ok(self.view());
        }
        let arrived = Instant::now();
        let age = self.confirmed_age(arrived);
        if age.is_some_and(|a| a < SERVE_STALE_MAX) {
            if age.is_some_and(|a| a >= RECONFIRM_AFTER)
                && let Ok(one) = self.confirming.clone().try_lock_owned()
            {
                let me = self.clone();
                tokio::spawn(async move {
                    let _one = one;
                    let _ = me.confirm().await;
                });
            }
            return Ok(self.view());
        }
        let _one = self.confirming.lock().await;
        let now = Instant::now();
        if self.confirmed_age(now).is_some_and(|a| a < SERVE_STALE_MAX) {
            return Ok(self.view());
        }
        let failed = self.freshness.lock().expect("freshness lock").failed.clone();
        if let Some((at, why)) = failed
            && at >= arrived
        {
            return Err(self.stale(age, &why));
        }
        self.confirm().await.map(|()| self.view()).map_err(|why| self.stale(age, &why))
    }

    fn confirmed_age(&self, now: Instant) -> Option<Duration> {
        let f = self.freshness.lock().expect("freshness lock");
        f.confirmed_at.map(|t| now.saturating_duration_since(t))
    }

    /// One read-index confirmation, recorded in `freshness`.
    async fn confirm(&self) -> Result<(), String> {
        let asked = Instant::now();
        let r = self.confirmed_view(CONFIRM_TIMEOUT).await;
        let mut f = self.freshness.lock().expect("freshness lock");
        match r {
            Ok(_) => {
                f.confirmed_at = Some(f.confirmed_at.map_or(asked, |t| t.max(asked)));
                Ok(())
            }
            Err(e) => {
                f.failed = Some((Instant::now(), e.to_string()));
                Err(e.to_string())
            }
        }
    }

    fn stale(&self, age: Option<Duration>, why: &str) -> BrokerError {
        let age = age.map_or_else(
            || "has never been confirmed current".to_owned(),
            |a| format!("has not been confirmed current for {:.1} s", a.as_secs_f64()),
        );
        BrokerError::Unavailable(format!("node {}'s metadata {age} ({why}); ask another node", self.me))
    }

    /// Removes `id` from the metadata group.
    pub async fn leave(&self, id: NodeId, timeout: Duration) -> Result<(), BrokerError> {
        self.request(MetaRequest::Leave { id }, timeout).await.map(|_| ())
    }

    async fn forward(
        &self,
        leader: NodeId,
        addr: &str,
        payload: Bytes,
        ttl: Duration,
    ) -> Result<MetaReply, Status> {
        let mut client = RaftClient::new(self.peers.channel(leader, addr));
        let mut req = tonic::Request::new(RaftRequest {
            group_id: META_GROUP,
            version: RAFT_WIRE_VERSION,
            payload,
            from: self.me,
            to: leader,
        });
        req.set_timeout(ttl);
        let reply = tokio::time::timeout(ttl, client.forward_meta(req))
            .await
            .map_err(|_| Status::deadline_exceeded("ForwardMeta timed out"))??;
        MetaReply::decode(&reply.into_inner().payload)
            .map_err(|e| Status::internal(format!("undecodable reply: {e}")))
    }
}

/// Serves `ForwardMeta` on the metadata leader. It does not forward again: a node that lost the
/// leadership answers `UNAVAILABLE` and the origin retries with fresh leader information.
pub struct MetaForwardService {
    pub handle: MetaHandle,
}

impl MetaForwarder for MetaForwardService {
    fn forward(&self, payload: Bytes) -> BoxFuture<'static, Result<Bytes, Status>> {
        let handle = self.handle.clone();
        Box::pin(async move {
            let req: MetaRequest = postcard::from_bytes(&payload)
                .map_err(|e| Status::invalid_argument(format!("payload: not a metadata request: {e}")))?;
            match handle.attempt_local(&req).await {
                Attempt::Done(r) => Ok(r.encode()),
                Attempt::Forward(l, _) => Err(Status::unavailable(format!(
                    "node {} is not the metadata leader; node {l} is",
                    handle.me
                ))),
                Attempt::Retry(why) => Err(Status::unavailable(why)),
            }
        })
    }
}
