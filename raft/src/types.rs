//! The openraft type configuration shared by every Raft group of an Eddy node.
//!
//! All groups (the metadata group and every partition group) use one configuration so that one
//! transport and one log-store implementation serve them all. Application payloads are opaque
//! bytes here: the `node` crate encodes its commands and replies, which keeps this crate free of
//! broker concepts.

use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

/// Identifies a node in the cluster. Assigned by the operator in the node's config.
pub type NodeId = u64;

/// Identifies a Raft group on a node. Group 0 is the metadata group.
pub type GroupId = u64;

/// The metadata (controller) group.
pub const META_GROUP: GroupId = 0;

/// The addresses a member publishes in Raft membership, so any node can reach any other.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Where `eddy.v1.Raft` listens.
    pub raft_addr: String,
    /// Where `eddy.v1.Broker` listens.
    pub client_addr: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} client={}", self.raft_addr, self.client_addr)
    }
}

/// An application command, encoded by the state machine that will apply it.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Payload(pub Bytes);

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A state machine's reply to an applied command, encoded by that state machine.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reply(pub Bytes);

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reply({} bytes)", self.0.len())
    }
}

/// The async runtime: tokio with openraft's randomness drawn from a seeded generator, so that a
/// simulation replays exactly. Production seeds it from the OS once at start-up.
pub type Runtime = openraft_rt::deterministic_rng::DeterministicRng<openraft_rt_tokio::TokioRuntime>;

openraft::declare_raft_types!(
    /// Eddy's Raft type configuration. Standard Raft leader ids: at most one leader per term,
    /// which is also the invariant the simulator checks.
    pub TypeConfig:
        D = Payload,
        R = Reply,
        NodeId = NodeId,
        Node = NodeAddr,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
        AsyncRuntime = Runtime,
);

pub type C = TypeConfig;
pub type LogId = openraft::type_config::alias::LogIdOf<C>;
pub type Vote = openraft::type_config::alias::VoteOf<C>;
pub type Entry = openraft::type_config::alias::EntryOf<C>;
pub type EntryPayload = openraft::type_config::alias::EntryPayloadOf<C>;
pub type Membership = openraft::Membership<NodeId, NodeAddr>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<C>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<C>;
/// Snapshots of Eddy's groups are small (metadata only), so they travel as one byte vector.
pub type SnapshotData = Vec<u8>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<C, SnapshotData>;
pub type RaftMetrics = openraft::RaftMetrics<C>;
pub type CommittedLeaderId = openraft::type_config::alias::CommittedLeaderIdOf<C>;

/// Builds a log id from its parts.
pub fn log_id(term: u64, index: u64) -> LogId {
    openraft::LogId::new(CommittedLeaderId::new(term), index)
}

/// The term of a log id.
pub fn log_term(id: &LogId) -> u64 {
    id.leader_id.term
}
