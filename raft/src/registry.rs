//! Which Raft groups this node hosts, for routing incoming Raft messages.
//!
//! Groups have different state-machine types, so the registry stores them behind [`RaftRpc`],
//! an object-safe view of the calls the transport makes on an `openraft::Raft`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::RwLock;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use openraft::Raft;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::Fatal;
use openraft::errors::RaftError;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::storage::RaftStateMachine;
use tonic::Status;

use crate::types::C;
use crate::types::GroupId;
use crate::types::Snapshot;
use crate::types::SnapshotData;
use crate::types::Vote;

/// The calls the transport server makes on a group.
pub trait RaftRpc: Send + Sync + 'static {
    fn vote(&self, req: VoteRequest<C>) -> BoxFuture<'_, Result<VoteResponse<C>, RaftError<C>>>;
    fn pre_vote(&self, req: VoteRequest<C>) -> BoxFuture<'_, Result<VoteResponse<C>, RaftError<C>>>;
    fn append_entries(
        &self,
        req: AppendEntriesRequest<C>,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<C>, RaftError<C>>>;
    fn stream_append(
        &self,
        input: BoxStream<'static, AppendEntriesRequest<C>>,
    ) -> BoxStream<'static, Result<StreamAppendResult<C>, Fatal<C>>>;
    fn install_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot,
    ) -> BoxFuture<'_, Result<SnapshotResponse<C>, Fatal<C>>>;
    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<C>,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<C>, Fatal<C>>>;
    /// Whom this replica follows, with what it would answer a vote request it refuses.
    fn follows(&self) -> Follows;
    /// Starts an election (without a pre-vote) unless this replica leads.
    fn campaign(&self) -> BoxFuture<'_, ()>;
    /// If this replica leads, sends its followers a heartbeat now.
    fn wake(&self) -> BoxFuture<'_, ()>;
}

/// A replica's leader as it knows it.
pub struct Follows {
    /// The leader it knows (itself, if it leads).
    pub leader: Option<crate::types::NodeId>,
    pub is_leader: bool,
    pub vote: Vote,
    /// Whether its log holds any entry (or a snapshot): a replica that has none grants no vote
    /// (see `RaftService::vote`).
    pub has_log: bool,
    /// The index of the last entry in its log.
    pub last_log_index: Option<u64>,
}

impl<SM> RaftRpc for Raft<C, SM>
where
    SM: RaftStateMachine<C, SnapshotData = SnapshotData>,
{
    fn vote(&self, req: VoteRequest<C>) -> BoxFuture<'_, Result<VoteResponse<C>, RaftError<C>>> {
        Box::pin(Raft::vote(self, req))
    }

    fn pre_vote(&self, req: VoteRequest<C>) -> BoxFuture<'_, Result<VoteResponse<C>, RaftError<C>>> {
        Box::pin(Raft::pre_vote(self, req))
    }

    fn append_entries(
        &self,
        req: AppendEntriesRequest<C>,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<C>, RaftError<C>>> {
        Box::pin(Raft::append_entries(self, req))
    }

    fn stream_append(
        &self,
        input: BoxStream<'static, AppendEntriesRequest<C>>,
    ) -> BoxStream<'static, Result<StreamAppendResult<C>, Fatal<C>>> {
        Box::pin(Raft::stream_append(self, input))
    }

    fn install_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot,
    ) -> BoxFuture<'_, Result<SnapshotResponse<C>, Fatal<C>>> {
        Box::pin(Raft::install_full_snapshot(self, vote, snapshot))
    }

    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<C>,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<C>, Fatal<C>>> {
        Box::pin(Raft::handle_transfer_leader(self, req))
    }

    fn follows(&self) -> Follows {
        let m = self.metrics();
        let m = m.borrow_watched();
        Follows {
            leader: m.current_leader,
            is_leader: m.state == openraft::ServerState::Leader,
            vote: m.vote,
            has_log: m.last_log_index.is_some(),
            last_log_index: m.last_log_index,
        }
    }

    fn campaign(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.trigger().elect(false).await;
        })
    }

    fn wake(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.server_metrics().borrow_watched().state == openraft::ServerState::Leader {
                let _ = self.trigger().heartbeat().await;
            }
        })
    }
}

/// Handles `ForwardMeta`: a metadata command sent to this node because it leads the metadata
/// group. The payload encoding belongs to the node crate.
pub trait MetaForwarder: Send + Sync + 'static {
    fn forward(&self, payload: Bytes) -> BoxFuture<'static, Result<Bytes, Status>>;
}

/// The groups a node hosts.
#[derive(Default)]
pub struct Registry {
    groups: RwLock<BTreeMap<GroupId, Arc<dyn RaftRpc>>>,
    forwarder: OnceLock<Arc<dyn MetaForwarder>>,
}

impl Registry {
    pub fn insert(&self, group: GroupId, raft: Arc<dyn RaftRpc>) {
        self.groups.write().expect("registry lock poisoned").insert(group, raft);
    }

    pub fn remove(&self, group: GroupId) -> Option<Arc<dyn RaftRpc>> {
        self.groups.write().expect("registry lock poisoned").remove(&group)
    }

    pub fn get(&self, group: GroupId) -> Option<Arc<dyn RaftRpc>> {
        self.groups.read().expect("registry lock poisoned").get(&group).cloned()
    }

    pub fn group_ids(&self) -> Vec<GroupId> {
        self.groups.read().expect("registry lock poisoned").keys().copied().collect()
    }

    /// Installs the metadata forwarder; only the first call has an effect.
    pub fn set_forwarder(&self, f: Arc<dyn MetaForwarder>) {
        let _ = self.forwarder.set(f);
    }

    pub fn forwarder(&self) -> Option<Arc<dyn MetaForwarder>> {
        self.forwarder.get().cloned()
    }
}
