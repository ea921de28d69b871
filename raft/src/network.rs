//! The client half of the Raft transport: openraft's `RaftNetworkV2` over `eddy.v1.Raft`.
//!
//! Every call has a deadline. Pipelined replication (`stream_append`) has no deadline as a
//! whole, since a stream lives as long as the leader replicates to that follower, so it is
//! watched instead: when a request is outstanding and no response arrives for
//! [`STREAM_RESPONSE_TIMEOUT_MIN`] (or four times openraft's per-RPC timeout, if larger), the
//! stream fails with a timeout and openraft opens a new one.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eddy_proto::RAFT_WIRE_VERSION;
use eddy_proto::v1::RaftCallKind;
use eddy_proto::v1::RaftReply;
use eddy_proto::v1::RaftRequest;
use eddy_proto::v1::raft_client::RaftClient;
use futures::FutureExt;
use futures::StreamExt;
use openraft::AnyError;
use openraft::OptionalSend;
use openraft::RPCTypes;
use openraft::RaftNetworkFactory;
use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Timeout;
use openraft::errors::Unreachable;
use openraft::network::Backoff;
use openraft::network::RPCOption;
use openraft::network::v2::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::Status;
use tonic::transport::Channel;

use crate::codec;
use crate::liveness::Liveness;
use crate::transport::Peers;
use crate::types::C;
use crate::types::GroupId;
use crate::types::NodeAddr;
use crate::types::NodeId;
use crate::types::Snapshot;
use crate::types::SnapshotData;
use crate::types::SnapshotMeta;
use crate::types::Vote;

/// A replication stream with outstanding requests fails if no response comes for this long.
pub const STREAM_RESPONSE_TIMEOUT_MIN: Duration = Duration::from_secs(2);
/// The first wait before replicating again to a peer that refused or dropped a call (down,
/// restarting, not hosting the group yet, a broken connection); it doubles up to
/// [`RETRY_BACKOFF_MAX`] while the errors go on, and a success resets it.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// See [`RETRY_BACKOFF_MIN`].
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(320);
/// The wait between replication attempts of a partition group to a peer that node liveness
/// judges down. Every group that peer follows kept asking it every [`RETRY_BACKOFF_MAX`] (each
/// a connection attempt): 6% of the surviving nodes' CPU while they elected new leaders for a
/// dead node's 1,000 partitions. The group's watch ends the wait when the peer comes back up
/// (`Trigger::reset_backoff`), so a returning follower is not kept waiting.
pub const DOWN_BACKOFF: Duration = Duration::from_secs(2);
/// Largest request of a one-request replication session that goes on the `Calls` stream (see
/// `PeerLink::stream_append`); a heartbeat is far smaller. Bounds a `Calls` frame to
/// `CALLS_PER_FRAME` times this.
pub const SINGLE_CALL_BYTES_MAX: usize = 4096;
/// gRPC metadata key naming the group of a `StreamAppend` stream.
pub const GROUP_HEADER: &str = "eddy-group-id";
/// Largest Raft message, in bytes. Entries are bounded by the produce request limit, and
/// replication reads are bounded well below this (see `REPLICATION_READ_BYTES_MAX`).
pub const RAFT_MESSAGE_BYTES_MAX: usize = 256 << 20;

/// A snapshot and the vote of the leader sending it, as one message.
#[derive(Serialize, Deserialize)]
pub struct SnapshotEnvelope {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub data: SnapshotData,
}

/// The followers of one group to which a replication session failed (an error or a timeout).
///
/// openraft sends a follower the new commit point in a replication session of its own, and
/// drops it when that session fails: it counts on the next heartbeat to bring it, and a
/// quiescent group sends none. So the follower stayed one commit behind until the next write
/// (simulator seed 118 with `--partitions 100`). The group's
/// [`GroupWatch`](crate::liveness::GroupWatch) takes these followers and heartbeats each until
/// it has answered one sent since.
#[derive(Debug, Default)]
pub struct FailedSessions {
    followers: Mutex<BTreeSet<NodeId>>,
    notify: Notify,
}

impl FailedSessions {
    fn mark(&self, follower: NodeId) {
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).insert(follower);
        // Stores a permit when the watch is busy, so no failure goes unnoticed.
        self.notify.notify_one();
    }

    /// The followers marked since the last call.
    pub fn take(&self) -> BTreeSet<NodeId> {
        std::mem::take(&mut *self.followers.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Completes when a follower was marked since the last wait.
    pub async fn marked(&self) {
        self.notify.notified().await
    }
}

/// A replication stream's requests that await a response, and a signal for each one sent.
#[derive(Default)]
struct Outstanding {
    count: AtomicU64,
    sent: Notify,
}

/// Creates the connections of one group to its peers.
pub struct GroupNetwork {
    group: GroupId,
    me: NodeId,
    peers: Arc<Peers>,
    liveness: Option<Arc<Liveness>>,
    failed: Arc<FailedSessions>,
}

impl GroupNetwork {
    pub fn new(group: GroupId, me: NodeId, peers: Arc<Peers>) -> Self {
        Self { group, me, peers, liveness: None, failed: Arc::default() }
    }

    /// The followers this group's replication sessions failed to; see [`FailedSessions`].
    pub fn failed_sessions(&self) -> Arc<FailedSessions> {
        self.failed.clone()
    }

    /// Replication to a peer judged down by `liveness` retries every [`DOWN_BACKOFF`]; the
    /// group's [`GroupWatch`](crate::liveness::GroupWatch) must reset the backoff when the peer
    /// comes back up.
    pub fn with_liveness(mut self, liveness: Arc<Liveness>) -> Self {
        self.liveness = Some(liveness);
        self
    }
}

impl RaftNetworkFactory<C> for GroupNetwork {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerLink {
        PeerLink {
            group: self.group,
            me: self.me,
            target,
            addr: node.raft_addr.clone(),
            peers: self.peers.clone(),
            liveness: self.liveness.clone(),
            failed: self.failed.clone(),
        }
    }
}

/// One group's connection to one peer (sharing the peer's channel with other groups).
pub struct PeerLink {
    group: GroupId,
    me: NodeId,
    target: NodeId,
    addr: String,
    peers: Arc<Peers>,
    liveness: Option<Arc<Liveness>>,
    failed: Arc<FailedSessions>,
}

impl PeerLink {
    /// A client on the peer's current channel, looked up per call so that a reconnect
    /// ([`Peers::reconnect`]) applies to links already made.
    fn client(&self) -> RaftClient<Channel> {
        RaftClient::new(self.peers.channel(self.target, &self.addr))
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
    }

    fn envelope(&self, payload: Vec<u8>) -> RaftRequest {
        RaftRequest {
            group_id: self.group,
            version: RAFT_WIRE_VERSION,
            payload: payload.into(),
            from: self.me,
            to: self.target,
        }
    }

    fn request(&self, payload: Vec<u8>, ttl: Duration) -> tonic::Request<RaftRequest> {
        let mut req = tonic::Request::new(self.envelope(payload));
        req.set_timeout(ttl);
        req
    }

    /// The error for a call to a peer that node liveness judges down, which is not attempted:
    /// a candidate's votes and a leader's heartbeats to a dead peer each cost a connection
    /// attempt (6% of the surviving nodes' CPU while they elected leaders for a dead node's
    /// 1,000 partitions). A wrong judgement lasts until the peer's next probe answer, and costs
    /// at most a retry.
    fn judged_down(&self) -> Option<RPCError<C>> {
        let down = self.liveness.as_ref().is_some_and(|l| !l.is_alive(self.target));
        down.then(|| {
            let msg = format!("node {} is judged down by node liveness", self.target);
            RPCError::Unreachable(Unreachable::new(&AnyError::error(msg)))
        })
    }

    /// Makes a short call on the peer's `Calls` stream (see [`crate::calls`]), with the same
    /// deadline and error mapping as [`Self::unary`].
    async fn call<T: serde::de::DeserializeOwned>(
        &mut self,
        kind: RaftCallKind,
        action: RPCTypes,
        ttl: Duration,
        payload: Vec<u8>,
        what: &str,
    ) -> Result<T, RPCError<C>> {
        if let Some(e) = self.judged_down() {
            return Err(e);
        }
        let link = self.peers.call_link(self.target, &self.addr);
        let (peers, target, addr) = (self.peers.clone(), self.target, self.addr.clone());
        let called = if link.supported() {
            link.call(move || peers.channel(target, &addr), kind, self.envelope(payload.clone()), ttl).await
        } else {
            Err(Status::unimplemented("the peer has no Calls"))
        };
        let reply = match called {
            Ok(reply) => reply,
            // A node of an older version (a rolling upgrade) has no `Calls`: ask it directly.
            Err(s) if s.code() == Code::Unimplemented => {
                return match kind {
                    RaftCallKind::PreVote => {
                        self.unary(action, ttl, |mut c, r| async move { c.pre_vote(r).await }, payload, what)
                            .await
                    }
                    RaftCallKind::TransferLeader => {
                        let f = |mut c: RaftClient<Channel>, r| async move { c.transfer_leader(r).await };
                        self.unary(action, ttl, f, payload, what).await
                    }
                    _ => {
                        self.unary(action, ttl, |mut c, r| async move { c.vote(r).await }, payload, what)
                            .await
                    }
                };
            }
            Err(s) => return Err(self.rpc_error(s, action, ttl)),
        };
        codec::decode(&reply, what).map_err(|s| self.rpc_error(s, action, ttl))
    }

    /// A replication session of one request, on the peer's `Calls` stream.
    async fn single_append(
        &mut self,
        request: RaftRequest,
        ttl: Duration,
    ) -> Result<StreamAppendResult<C>, RPCError<C>> {
        let link = self.peers.call_link(self.target, &self.addr);
        let (peers, target, addr) = (self.peers.clone(), self.target, self.addr.clone());
        let action = RPCTypes::AppendEntries;
        let reply = link
            .call(move || peers.channel(target, &addr), RaftCallKind::Append, request, ttl)
            .await
            .map_err(|s| self.rpc_error(s, action, ttl))?;
        codec::decode(&reply, "StreamAppendResult").map_err(|s| self.rpc_error(s, action, ttl))
    }

    fn rpc_error(&self, status: Status, action: RPCTypes, ttl: Duration) -> RPCError<C> {
        status_to_rpc_error(status, action, self.me, self.target, ttl)
    }

    /// Runs a unary call with a deadline enforced on both sides (the server sees the
    /// `grpc-timeout`; the local timer covers a peer that never answers).
    async fn unary<T, Fut>(
        &mut self,
        action: RPCTypes,
        ttl: Duration,
        call: impl FnOnce(RaftClient<Channel>, tonic::Request<RaftRequest>) -> Fut,
        payload: Vec<u8>,
        what: &str,
    ) -> Result<T, RPCError<C>>
    where
        T: serde::de::DeserializeOwned,
        Fut: Future<Output = Result<tonic::Response<RaftReply>, Status>>,
    {
        if let Some(e) = self.judged_down() {
            return Err(e);
        }
        let req = self.request(payload, ttl);
        let reply = match tokio::time::timeout(ttl, call(self.client(), req)).await {
            Err(_) => return Err(timeout(action, self.me, self.target, ttl)),
            Ok(Err(status)) => return Err(self.rpc_error(status, action, ttl)),
            Ok(Ok(r)) => r.into_inner(),
        };
        codec::decode(&reply.payload, what).map_err(|s| self.rpc_error(s, action, ttl))
    }
}

fn timeout(action: RPCTypes, me: NodeId, target: NodeId, ttl: Duration) -> RPCError<C> {
    RPCError::Timeout(Timeout { action, id: me, target, timeout: ttl })
}

fn status_to_rpc_error(
    status: Status,
    action: RPCTypes,
    me: NodeId,
    target: NodeId,
    ttl: Duration,
) -> RPCError<C> {
    match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => timeout(action, me, target, ttl),
        // A peer that is down, restarting, or not (yet) hosting the group: back off.
        Code::Unavailable | Code::NotFound | Code::Unknown | Code::Internal | Code::FailedPrecondition => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

impl RaftNetworkV2<C> for PeerLink {
    type SnapshotData = SnapshotData;

    fn backoff(&self) -> Option<Backoff> {
        let (liveness, target) = (self.liveness.clone(), self.target);
        let mut next = RETRY_BACKOFF_MIN;
        Some(Backoff::new(std::iter::from_fn(move || {
            if liveness.as_ref().is_some_and(|l| !l.is_alive(target)) {
                return Some(DOWN_BACKOFF);
            }
            let wait = next;
            next = (next * 2).min(RETRY_BACKOFF_MAX);
            Some(wait)
        })))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let payload = codec::encode(&rpc);
        self.unary(
            RPCTypes::AppendEntries,
            option.hard_ttl(),
            |mut c, r| async move { c.append_entries(r).await },
            payload,
            "AppendEntriesResponse",
        )
        .await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>, RPCError<C>>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<C>> + OptionalSend + Unpin + 'static,
    {
        let ttl = option.hard_ttl();
        let response_timeout = STREAM_RESPONSE_TIMEOUT_MIN.max(ttl * 4);
        let (me, target, group) = (self.me, self.target, self.group);
        let outstanding = Arc::new(Outstanding::default());
        let sent = outstanding.clone();
        // openraft's request stream of a session shares the replication state with the next
        // session's, and waits for new log entries while holding it. Once openraft has dropped
        // the responses (the session ended: a conflict, an error, a timeout), nothing must poll
        // this session's requests again, or it would consume entries meant for the next session
        // and block it until the next write. The guard ends the requests when the responses go.
        let ended = CancellationToken::new();
        let ended_guard = ended.clone().drop_guard();
        let mut requests = Box::pin(input.take_until(ended.cancelled_owned()).map(move |r| {
            sent.count.fetch_add(1, Ordering::Relaxed);
            sent.sent.notify_one();
            RaftRequest {
                group_id: group,
                version: RAFT_WIRE_VERSION,
                payload: codec::encode(&r).into(),
                from: me,
                to: target,
            }
        }));
        let mut client = self.client();
        let failed = self.failed.clone();
        Box::pin(async move {
            // The call opens only once the session has its first request: openraft waits out its
            // replication backoff before yielding it, and a call opened at once would bypass
            // that backoff, so a peer that refuses the call (down, restarting, not hosting the
            // group yet) was asked again every few milliseconds by every group.
            let Some(first) = requests.next().await else {
                return Ok(Box::pin(futures::stream::empty()) as BoxStream<'s, _>);
            };
            // Judged when the request exists: openraft's backoff may have waited for the peer.
            if let Some(e) = self.judged_down() {
                return Err(e);
            }
            // A session of one small request (a heartbeat: openraft sends each as a session of
            // its own) goes on the peer's `Calls` stream with other groups' calls instead of
            // opening an HTTP/2 stream of its own.
            let calls = self.peers.call_link(target, &self.addr).supported();
            let second = match requests.next().now_or_never() {
                Some(None) if calls && first.payload.len() <= SINGLE_CALL_BYTES_MAX => {
                    let result = self.single_append(first, ttl).await;
                    let result = result.inspect_err(|_| failed.mark(target));
                    return Ok(Box::pin(futures::stream::once(async move { result })) as BoxStream<'s, _>);
                }
                Some(None) => None,
                Some(Some(second)) => Some(second),
                None => None,
            };
            let head = futures::stream::iter(std::iter::once(first).chain(second));
            let mut req = tonic::Request::new(head.chain(requests));
            req.metadata_mut().insert(GROUP_HEADER, group.into());
            let established = tokio::time::timeout(response_timeout, client.stream_append(req)).await;
            let responses = match established {
                Err(_) => Err(timeout(RPCTypes::AppendEntries, me, target, response_timeout)),
                Ok(Err(status)) => Err(status_to_rpc_error(status, RPCTypes::AppendEntries, me, target, ttl)),
                Ok(Ok(r)) => Ok(r.into_inner()),
            };
            let responses = responses.inspect_err(|_| failed.mark(target))?;
            let stream = futures::stream::unfold(Some(responses), move |state| {
                let _ended_guard = &ended_guard;
                let outstanding = outstanding.clone();
                let failed = failed.clone();
                async move {
                    let mut responses = state?;
                    loop {
                        let next = if outstanding.count.load(Ordering::Relaxed) == 0 {
                            // Nothing is asked: the stream waits without a timer, so a quiet
                            // group's open streams cost no wake-ups (with a timer each woke
                            // every 2 s: 3,000 wake-ups a second at 3,000 partitions), until a
                            // response (the server ending the stream) or a request.
                            tokio::select! {
                                r = responses.message() => Ok(r),
                                () = outstanding.sent.notified() => continue,
                            }
                        } else {
                            tokio::time::timeout(response_timeout, responses.message()).await
                        };
                        let e = match next {
                            Err(_) => timeout(RPCTypes::AppendEntries, me, target, response_timeout),
                            Ok(Ok(None)) => return None,
                            Ok(Err(status)) => {
                                status_to_rpc_error(status, RPCTypes::AppendEntries, me, target, ttl)
                            }
                            Ok(Ok(Some(reply))) => {
                                outstanding.count.fetch_sub(1, Ordering::Relaxed);
                                match codec::decode::<StreamAppendResult<C>>(
                                    &reply.payload,
                                    "StreamAppendResult",
                                ) {
                                    Ok(r) => return Some((Ok(r), Some(responses))),
                                    Err(s) => {
                                        status_to_rpc_error(s, RPCTypes::AppendEntries, me, target, ttl)
                                    }
                                }
                            }
                        };
                        // The session ends here; see `FailedSessions`.
                        failed.mark(target);
                        return Some((Err(e), None));
                    }
                }
            });
            Ok(Box::pin(stream) as BoxStream<'s, _>)
        })
    }

    async fn vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        let payload = codec::encode(&rpc);
        self.call(RaftCallKind::Vote, RPCTypes::Vote, option.hard_ttl(), payload, "VoteResponse").await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        let payload = codec::encode(&rpc);
        self.call(RaftCallKind::PreVote, RPCTypes::Vote, option.hard_ttl(), payload, "VoteResponse").await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let payload = codec::encode(&SnapshotEnvelope { vote, meta: snapshot.meta, data: snapshot.snapshot });
        let ttl = option.hard_ttl();
        let call = self.unary::<SnapshotResponse<C>, _>(
            RPCTypes::InstallSnapshot,
            ttl,
            |mut c, r| async move { c.install_snapshot(r).await },
            payload,
            "SnapshotResponse",
        );
        tokio::select! {
            // Safe to cancel: dropping an unanswered call only abandons it; the follower treats
            // a snapshot as installed only after receiving it whole.
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = call => r.map_err(|e| match e {
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&AnyError::error(r.to_string()))),
            }),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        let payload = codec::encode(&req);
        self.call(
            RaftCallKind::TransferLeader,
            RPCTypes::TransferLeader,
            option.hard_ttl(),
            payload,
            "TransferLeaderResponse",
        )
        .await
    }
}
