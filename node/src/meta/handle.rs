//! [`MetaHandle`]: how the rest of the node reads and changes the metadata.
//!
//! Reads come from this node's replica (it may lag the leader briefly). Writes go through the
//! metadata leader: a node that is not the leader forwards the command over `ForwardMeta` to the
//! leader, which proposes it and returns the state machine's reply.

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eddy_proto::RAFT_WIRE_VERSION;
use eddy_proto::v1::RaftRequest;
use eddy_proto::v1::raft_client::RaftClient;
use eddy_raft::C;
use eddy_raft::META_GROUP;
use eddy_raft::NodeId;
use eddy_raft::Payload;
use eddy_raft::registry::MetaForwarder;
use eddy_raft::transport::Peers;
use futures::future::BoxFuture;
use openraft::errors::ClientWriteError;
use openraft::errors::RaftError;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

use super::command::MetaCommand;
use super::command::MetaReply;
use super::sm::MetaStateMachine;
use super::sm::MetaView;
use crate::error::BrokerError;

pub type MetaRaft = openraft::Raft<C, MetaStateMachine>;

/// Pause before retrying a metadata write while the leader is unknown or changing.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub struct MetaHandle {
    raft: MetaRaft,
    view: watch::Receiver<Arc<MetaView>>,
    peers: Arc<Peers>,
    me: NodeId,
}

enum Attempt {
    Done(MetaReply),
    Forward(NodeId, String),
    Retry(String),
}

impl MetaHandle {
    pub fn new(raft: MetaRaft, view: watch::Receiver<Arc<MetaView>>, peers: Arc<Peers>, me: NodeId) -> Self {
        Self {
            raft,
            view,
            peers,
            me,
        }
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

    /// The metadata leader as this node knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// True once this node knows a metadata leader and has applied its log.
    pub fn is_ready(&self) -> bool {
        let m = self.raft.metrics().borrow_watched().clone();
        m.current_leader.is_some() && m.last_applied.is_some()
    }

    async fn attempt_local(&self, payload: Bytes) -> Attempt {
        match self.raft.client_write(Payload(payload)).await {
            Ok(resp) => match MetaReply::decode(&resp.data.0) {
                Ok(r) => Attempt::Done(r),
                Err(e) => Attempt::Done(MetaReply::Error(super::MetaError::Invalid(format!(
                    "undecodable reply: {e}"
                )))),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                match (f.leader_id, f.leader_node) {
                    (Some(id), Some(node)) if id != self.me => Attempt::Forward(id, node.raft_addr),
                    _ => Attempt::Retry("the metadata group has no leader yet".into()),
                }
            }
            Err(e) => Attempt::Retry(format!("metadata write failed: {e}")),
        }
    }

    /// Proposes `cmd` to the metadata group and returns the state machine's reply. Retries
    /// through leader changes until `timeout` has passed.
    pub async fn write(&self, cmd: MetaCommand, timeout: Duration) -> Result<MetaReply, BrokerError> {
        let deadline = Instant::now() + timeout;
        let payload = cmd.encode();
        let mut last = String::from("no attempt made");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(BrokerError::Timeout(format!(
                    "metadata write not confirmed within {timeout:?} ({last}); it may or may not have been applied"
                )));
            }
            let attempt = tokio::time::timeout(remaining, self.attempt_local(payload.clone())).await;
            match attempt {
                Err(_) => last = "timed out waiting for the metadata group".into(),
                Ok(Attempt::Done(r)) => return Ok(r),
                Ok(Attempt::Retry(why)) => last = why,
                Ok(Attempt::Forward(leader, addr)) => {
                    match self.forward(leader, &addr, payload.clone(), remaining).await {
                        Ok(r) => return Ok(r),
                        Err(status) => {
                            last = format!(
                                "forwarding to metadata leader {leader} failed: {}",
                                status.message()
                            )
                        }
                    }
                }
            }
            tokio::time::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
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
            if let Err(e) = MetaCommand::decode(&payload) {
                return Err(Status::invalid_argument(format!(
                    "payload: not a metadata command: {e}"
                )));
            }
            match handle.attempt_local(payload).await {
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
