//! The server half of the Raft transport: `eddy.v1.Raft`, routing each message to its group.
//!
//! A message for a group this node does not host is answered `NOT_FOUND`; the sender treats that
//! as unreachable and backs off (the group may not have started here yet).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use eddy_proto::RAFT_WIRE_VERSION;
use eddy_proto::v1::NodeHeartbeat;
use eddy_proto::v1::NodeIds;
use eddy_proto::v1::RaftCallKind;
use eddy_proto::v1::RaftCalls;
use eddy_proto::v1::RaftReply;
use eddy_proto::v1::RaftRequest;
use eddy_proto::v1::RaftResult;
use eddy_proto::v1::RaftResults;
use eddy_proto::v1::raft_server;
use futures::Stream;
use futures::StreamExt;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::TransferLeaderError;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;
use tracing::debug;

use crate::calls;
use crate::codec;
use crate::liveness::Liveness;
use crate::liveness::TRANSFER_GRACE;
use crate::network::GROUP_HEADER;
use crate::network::RAFT_MESSAGE_BYTES_MAX;
use crate::network::SnapshotEnvelope;
use crate::registry::RaftRpc;
use crate::registry::Registry;
use crate::types::C;
use crate::types::GroupId;
use crate::types::META_GROUP;
use crate::types::NodeId;
use crate::types::Runtime;
use crate::types::Snapshot;

/// The longest a callee works on a call from a `Calls` stream, whatever deadline it names.
const CALL_TIMEOUT_MAX_MS: u32 = 60_000;

/// `eddy.v1.Raft` for one node.
#[derive(Clone)]
pub struct RaftService {
    registry: Arc<Registry>,
    liveness: Arc<Liveness>,
    me: NodeId,
    /// Seeds the task openraft spawns for each incoming replication stream.
    seed: u64,
    /// Ends every replication stream, so that the server can drain and stop: a stream lives as
    /// long as its leader keeps sending.
    shutdown: CancellationToken,
}

impl RaftService {
    pub fn new(
        registry: Arc<Registry>,
        liveness: Arc<Liveness>,
        seed: u64,
        shutdown: CancellationToken,
    ) -> Self {
        Self { me: liveness.me(), registry, liveness, seed, shutdown }
    }

    /// The tonic server for this service, with Eddy's message limits.
    pub fn into_server(self) -> raft_server::RaftServer<Self> {
        raft_server::RaftServer::new(self)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
    }

    fn group(&self, group: GroupId) -> Result<Arc<dyn RaftRpc>, Status> {
        self.registry
            .get(group)
            .ok_or_else(|| Status::not_found(format!("node {} does not host group {group}", self.me)))
    }

    fn open(&self, req: &RaftRequest) -> Result<Arc<dyn RaftRpc>, Status> {
        check_envelope(req, self.me)?;
        self.group(req.group_id)
    }

    async fn do_vote(&self, req: RaftRequest) -> Result<RaftReply, Status> {
        let g = self.open(&req)?;
        let vote_req: VoteRequest<C> = codec::decode(&req.payload, "VoteRequest")?;
        if let Some(refusal) = self.refuse_without_log(&*g, req.group_id, &vote_req) {
            return Ok(refusal);
        }
        let resp = g.vote(vote_req).await.map_err(fatal)?;
        Ok(reply_body(&resp))
    }

    /// A partition replica whose log holds nothing grants no vote. Founding replicas write the group's
    /// first membership before they can be reached, and a replica added by a move is a
    /// learner that catches up before it may vote, so the only replica without a log that can
    /// be asked is one a move took away (deleting its log and vote) and a later move brought
    /// back: a candidate still holding a configuration from before it left counts it as a
    /// voter, and its fresh, empty vote would let that stale candidate win a term another
    /// leader already holds (simulator seed 9, with `move-back`: two leaders in term 5). It
    /// votes once its group's leader has sent it entries, and so its configuration.
    fn refuse_without_log(&self, g: &dyn RaftRpc, group: u64, req: &VoteRequest<C>) -> Option<RaftReply> {
        let f = g.follows();
        // The metadata group is initialized by one node; its other first members vote with
        // empty logs, and a node leaves it for good (a removed node never returns).
        if f.has_log || group == META_GROUP {
            return None;
        }
        debug!(node = self.me, group, candidate = %req.vote, "refusing a vote: this replica has no log yet");
        Some(reply_body(&VoteResponse::<C>::new(f.vote, None, false)))
    }

    async fn do_pre_vote(&self, req: RaftRequest) -> Result<RaftReply, Status> {
        let g = self.open(&req)?;
        let vote_req: VoteRequest<C> = codec::decode(&req.payload, "VoteRequest")?;
        if let Some(refusal) = self.refuse_without_log(&*g, req.group_id, &vote_req) {
            return Ok(refusal);
        }
        // Leader stickiness from node liveness (partition groups; the metadata group keeps
        // openraft's own timers and lease): quiescent groups exchange no messages, so
        // openraft's own leader lease has long expired on an idle group; the leader this
        // replica follows is still there as long as its node answers liveness probes.
        let f = g.follows();
        let candidate = Some(vote_req.vote.leader_id().voted_for);
        let term = f.vote.leader_id().term;
        if req.group_id != META_GROUP
            && let Some(leader) = f.leader
            && leader != self.me
            && Some(leader) == candidate
            && vote_req.vote.leader_id().term > term
        {
            // The leader this replica follows asks for a later term: it no longer leads (it
            // restarted, or gave up), and no live node will step in while this replica counts
            // it as alive. (Its own campaign may fail for a shorter log, as after a restart
            // that lost unsynced entries, so the replica must not wait for it.)
            debug!(
                node = self.me,
                group = req.group_id,
                leader,
                term,
                "the leader asks for a later term: disowned"
            );
            self.liveness.disown(req.group_id, leader, term);
        }
        if req.group_id != META_GROUP
            && let Some(leader) = f.leader
            && Some(leader) != candidate
            && ((leader == self.me && f.is_leader)
                || (leader != self.me && !self.liveness.leader_suspected(req.group_id, leader, term)))
        {
            debug!(
                node = self.me,
                group = req.group_id,
                leader,
                ?candidate,
                is_leader = f.is_leader,
                term,
                "refusing a pre-vote: the leader is alive"
            );
            return Ok(reply_body(&VoteResponse::<C>::new(f.vote, None, false)));
        }
        let resp = g.pre_vote(vote_req).await.map_err(fatal)?;
        if resp.vote_granted
            && let Some(c) = candidate.filter(|c| *c != self.me)
        {
            self.liveness.pre_vote_granted(req.group_id, c);
        }
        Ok(reply_body(&resp))
    }

    async fn do_transfer_leader(&self, req: RaftRequest) -> Result<RaftReply, Status> {
        let g = self.open(&req)?;
        let transfer: TransferLeaderRequest<C> = codec::decode(&req.payload, "TransferLeaderRequest")?;
        let (leader, term) =
            (transfer.from_leader().leader_id().voted_for, transfer.from_leader().leader_id().term);
        let (to, expected) = (*transfer.to_node_id(), transfer.last_log_id().map(|l| l.index));
        let from = *transfer.from_leader();
        let resp = g.transfer_leader(transfer).await.map_err(fatal)?;
        if to == self.me
            && let Err(TransferLeaderError::LogNotFlushed { actual: None, .. }) = &resp
        {
            // openraft's target waits until its flushed log reaches the leader's last entry,
            // but it counts only what it flushed since it started: a replica restarted with
            // every entry already on disk reports nothing flushed until the leader sends more,
            // and a leader under transfer sends nothing more. That transfer could never
            // complete (simulator seed 51: a restarted follower, fully caught up, refused every
            // transfer while the leader refused writes). The log it loaded at start counts:
            // with the leader's vote and its last index, it campaigns. An election is safe
            // whatever the log holds (voters compare logs); this only makes it happen.
            let f = g.follows();
            if f.vote == from && f.last_log_index >= expected {
                debug!(
                    group = req.group_id,
                    leader, term, "taking over a transfer with the log loaded at start"
                );
                g.campaign().await;
            }
        }
        if req.group_id != META_GROUP {
            // A leader that started a transfer accepts no writes until it is no longer leader,
            // and openraft never abandons a transfer; with no election timers, a transfer the
            // target cannot complete would leave the group stuck. So a replica that still
            // follows that leader in that term after `TRANSFER_GRACE` counts it as gone.
            let (liveness, group) = (self.liveness.clone(), req.group_id);
            tokio::spawn(async move {
                tokio::time::sleep(TRANSFER_GRACE).await;
                let f = g.follows();
                if !f.is_leader && f.leader == Some(leader) && f.vote.leader_id().term == term {
                    debug!(group, leader, term, "leadership transfer did not complete: electing");
                    liveness.disown(group, leader, term);
                }
            });
        }
        Ok(reply_body(&resp))
    }

    /// A replication session of one request (a heartbeat), as `stream_append` would run it.
    async fn do_append_one(&self, req: RaftRequest) -> Result<RaftReply, Status> {
        let g = self.open(&req)?;
        let rpc: AppendEntriesRequest<C> = codec::decode(&req.payload, "AppendEntriesRequest")?;
        let input: futures::stream::BoxStream<'static, AppendEntriesRequest<C>> =
            Box::pin(futures::stream::once(async move { rpc }));
        // openraft spawns a task per session; its randomness must come from a seeded scope.
        let output = Runtime::scope(self.seed ^ req.group_id, async move { g.stream_append(input) }).await;
        match Box::pin(output).next().await {
            Some(Ok(result)) => Ok(reply_body(&result)),
            Some(Err(e)) => Err(fatal(e)),
            None => Err(Status::unavailable("raft group stopped: the session ended without a result")),
        }
    }

    /// A call that arrived on a `Calls` stream.
    async fn dispatch(&self, kind: i32, req: Option<RaftRequest>) -> Result<RaftReply, Status> {
        let req = req.ok_or_else(|| Status::invalid_argument("request: missing"))?;
        match RaftCallKind::try_from(kind) {
            Ok(RaftCallKind::Vote) => self.do_vote(req).await,
            Ok(RaftCallKind::PreVote) => self.do_pre_vote(req).await,
            Ok(RaftCallKind::TransferLeader) => self.do_transfer_leader(req).await,
            Ok(RaftCallKind::Append) => self.do_append_one(req).await,
            Ok(RaftCallKind::Unspecified) | Err(_) => {
                Err(Status::invalid_argument(format!("kind: {kind} is not a known Raft call")))
            }
        }
    }
}

/// Refuses a message in a wire version this node does not speak, or one for another node (its
/// sender reached this node at an address it holds for that one).
fn check_envelope(req: &RaftRequest, me: NodeId) -> Result<(), Status> {
    if req.version != RAFT_WIRE_VERSION {
        return Err(Status::invalid_argument(format!(
            "version: Raft wire version {} is not supported (this node speaks {RAFT_WIRE_VERSION})",
            req.version
        )));
    }
    if req.to != 0 && req.to != me {
        return Err(Status::failed_precondition(format!(
            "to: node {} sent a message for node {} to node {me}: its address for node {} is this node's",
            req.from, req.to, req.to
        )));
    }
    Ok(())
}

fn reply<T: serde::Serialize>(value: &T) -> Response<RaftReply> {
    Response::new(reply_body(value))
}

fn reply_body<T: serde::Serialize>(value: &T) -> RaftReply {
    RaftReply { payload: codec::encode(value).into() }
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft group stopped: {e}"))
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<RaftReply, Status>> + Send>>;

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.do_vote(request.into_inner()).await.map(Response::new)
    }

    async fn pre_vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.do_pre_vote(request.into_inner()).await.map(Response::new)
    }

    async fn append_entries(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let g = self.open(&req)?;
        let resp =
            g.append_entries(codec::decode(&req.payload, "AppendEntriesRequest")?).await.map_err(fatal)?;
        Ok(reply(&resp))
    }

    type StreamAppendStream = ReplyStream;

    async fn stream_append(
        &self,
        request: Request<Streaming<RaftRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let group: GroupId = request
            .metadata()
            .get(GROUP_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Status::invalid_argument(format!("{GROUP_HEADER}: missing or not a group id")))?;
        let g = self.group(group)?;
        // Requests that fail to decode end the input; the leader sees the stream end and retries.
        let input: futures::stream::BoxStream<'static, AppendEntriesRequest<C>> =
            Box::pin(decode_requests(request.into_inner(), group, self.me));
        // openraft spawns a task per stream; its randomness must come from a seeded scope.
        let output = Runtime::scope(self.seed ^ group, async move { g.stream_append(input) }).await;
        let output = output.map(|r| match r {
            Ok(result) => Ok(RaftReply { payload: codec::encode(&result).into() }),
            Err(e) => Err(fatal(e)),
        });
        Ok(Response::new(Box::pin(output.take_until(self.shutdown.clone().cancelled_owned()))))
    }

    async fn install_snapshot(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let g = self.open(&req)?;
        let env: SnapshotEnvelope = codec::decode(&req.payload, "snapshot")?;
        let snapshot = Snapshot { meta: env.meta, snapshot: env.data };
        let resp = g.install_snapshot(env.vote, snapshot).await.map_err(fatal)?;
        Ok(reply(&resp))
    }

    async fn transfer_leader(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.do_transfer_leader(request.into_inner()).await.map(Response::new)
    }

    type CallsStream = Pin<Box<dyn Stream<Item = Result<RaftResults, Status>> + Send>>;

    async fn calls(
        &self,
        request: Request<Streaming<RaftCalls>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        let mut input = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel::<RaftResult>();
        let (service, shutdown) = (self.clone(), self.shutdown.clone());
        // Each call runs as a task of its own, so a slow group delays no other group's call.
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    m = input.message() => m,
                    () = shutdown.cancelled() => break,
                };
                let Ok(Some(batch)) = batch else { break };
                for call in batch.calls {
                    let (service, tx) = (service.clone(), tx.clone());
                    tokio::spawn(async move {
                        let ttl =
                            Duration::from_millis(u64::from(call.timeout_ms.clamp(1, CALL_TIMEOUT_MAX_MS)));
                        let r = match tokio::time::timeout(ttl, service.dispatch(call.kind, call.request))
                            .await
                        {
                            Err(_) => Err(Status::deadline_exceeded(format!("no result within {ttl:?}"))),
                            Ok(r) => r.map(|reply| reply.payload),
                        };
                        let _ = tx.send(calls::result(call.id, r));
                    });
                }
            }
        });
        // The stream ends once the caller's calls have ended and every call has its result.
        let results = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) })
            .ready_chunks(calls::CALLS_PER_FRAME)
            .map(|results| Ok(RaftResults { results }));
        Ok(Response::new(Box::pin(results.take_until(self.shutdown.clone().cancelled_owned()))))
    }

    async fn heartbeat(&self, request: Request<NodeHeartbeat>) -> Result<Response<NodeHeartbeat>, Status> {
        let req = request.into_inner();
        for w in req.wake {
            self.liveness.note_replica(req.from, &w);
            let Some(g) = self.registry.get(w.group_id) else { continue };
            let f = g.follows();
            if f.is_leader {
                g.wake().await;
            } else if w.leader_lost && f.leader == Some(req.from) && f.vote.leader_id().term == w.term {
                // The node this replica follows led the group in this term and restarted since:
                // this replica must not wait for it.
                self.liveness.disown(w.group_id, req.from, w.term);
            }
        }
        Ok(Response::new(self.liveness.answer()))
    }

    async fn members(&self, request: Request<NodeIds>) -> Result<Response<NodeIds>, Status> {
        let ids = request.into_inner().ids.into_iter().filter(|id| self.liveness.is_member(*id)).collect();
        Ok(Response::new(NodeIds { ids }))
    }

    async fn forward_meta(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        check_envelope(&req, self.me)?;
        let f =
            self.registry.forwarder().ok_or_else(|| Status::unavailable("metadata service is starting"))?;
        let payload = f.forward(req.payload).await?;
        Ok(Response::new(RaftReply { payload }))
    }
}

/// Decodes the requests of a replication stream, ending it at the first bad one.
fn decode_requests(
    input: Streaming<RaftRequest>,
    group: GroupId,
    me: NodeId,
) -> impl Stream<Item = AppendEntriesRequest<C>> + Send + 'static {
    futures::stream::unfold(Some(input), move |state| async move {
        let mut input = state?;
        match input.message().await {
            Ok(Some(req)) if req.group_id == group && check_envelope(&req, me).is_ok() => {
                match codec::decode::<AppendEntriesRequest<C>>(&req.payload, "AppendEntriesRequest") {
                    Ok(r) => Some((r, Some(input))),
                    Err(e) => {
                        debug!(group, "dropping replication stream: {e}");
                        None
                    }
                }
            }
            Ok(Some(req)) => {
                debug!(
                    group,
                    got = req.group_id,
                    to = req.to,
                    "dropping replication stream: message for another group, node or version"
                );
                None
            }
            Ok(None) => None,
            Err(e) => {
                debug!(group, "replication stream ended: {e}");
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_for_another_node_or_wire_version_is_refused_by_name() {
        let req =
            |to, version| RaftRequest { group_id: 3, version, payload: Default::default(), from: 1, to };
        assert!(check_envelope(&req(2, RAFT_WIRE_VERSION), 2).is_ok());
        // Builds before the field name no node.
        assert!(check_envelope(&req(0, RAFT_WIRE_VERSION), 2).is_ok());
        let e = check_envelope(&req(4, RAFT_WIRE_VERSION), 2).expect_err("for node 4");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("node 1 sent a message for node 4 to node 2"), "{}", e.message());
        let e = check_envelope(&req(2, RAFT_WIRE_VERSION + 1), 2).expect_err("a newer wire version");
        assert!(e.message().contains("is not supported"), "{}", e.message());
    }
}
