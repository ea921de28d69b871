//! Commands of the metadata group and their replies, as they travel in Raft entries.

use std::collections::BTreeMap;

use bytes::Bytes;
use eddy_raft::GroupId;
use eddy_raft::NodeId;
use serde::Deserialize;
use serde::Serialize;

use super::groups::Assignment;
use super::groups::Assignor;
use super::groups::TopicPartition;
use super::state::NodeState;
use super::state::TopicRecord;
use crate::security::acl::AclBinding;
use crate::security::users::UserRecord;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Create a topic; the state machine chooses the placement.
    CreateTopic {
        name: String,
        partitions: u32,
        replication_factor: u32,
        config: BTreeMap<String, String>,
    },
    AllocateProducerId,
    DeleteTopic {
        name: String,
    },
    /// Set (add or replace) topic settings.
    AlterTopicConfig {
        name: String,
        set: BTreeMap<String, String>,
    },
    /// Add `count` partitions to a topic.
    AddPartitions {
        name: String,
        count: u32,
    },
    /// Start moving a partition to a new replica set.
    MovePartition {
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
    },
    /// The partition's leader reports that its group's membership now equals `replicas`.
    CompleteMove {
        group: GroupId,
        replicas: Vec<NodeId>,
    },
    CancelMove {
        topic: String,
        partition: u32,
    },
    /// Drain, undrain, decommission, or (internally, once it holds nothing) remove a node.
    SetNodeState {
        node: NodeId,
        state: NodeState,
    },
    /// Make `node` the partition's preferred leader (the first of its replicas), so that
    /// leadership balancing keeps a leadership an operator moved there.
    SetPreferredLeader {
        topic: String,
        partition: u32,
        node: NodeId,
    },
    /// A consumer joins `group` (created on first join); the state machine names the member.
    JoinGroup {
        group: String,
        topics: Vec<String>,
        session_timeout_ms: u32,
        assignor: Assignor,
    },
    /// A member reports the partitions it consumes, in the generation it knows. Proposed only
    /// when that differs from what the state machine recorded.
    GroupHeartbeat {
        group: String,
        member: String,
        generation: u64,
        owned: Vec<TopicPartition>,
    },
    LeaveGroup {
        group: String,
        member: String,
    },
    /// The coordinator saw no heartbeat from `member` within its session timeout.
    ExpireMember {
        group: String,
        member: String,
    },
    /// Commits offsets for a member (fenced), or for an empty group when `member` is `None`.
    CommitOffsets {
        group: String,
        member: Option<String>,
        offsets: Vec<(TopicPartition, u64)>,
    },
    /// Sets offsets of an empty group, backwards too.
    ResetOffsets {
        group: String,
        offsets: Vec<(TopicPartition, u64)>,
    },
    DeleteGroup {
        group: String,
    },
    /// A node's description of itself from its configuration (its Kafka listener's address and
    /// its rack), which other nodes hand to clients. Each node proposes it when its record
    /// differs from its configuration (see `crate::control::registration`).
    RegisterNode {
        node: NodeId,
        kafka_addr: Option<String>,
        rack: Option<String>,
    },
    /// [`MetaCommand::CommitOffsets`] for an unfenced commit with each offset's metadata string
    /// (a Kafka client's `committed_metadata`; empty for none).
    CommitOffsetsWithMetadata {
        group: String,
        offsets: Vec<(TopicPartition, u64, String)>,
    },
    /// Create a user with these credentials, or replace an existing user's when `replace`.
    PutUser {
        name: String,
        record: UserRecord,
        replace: bool,
    },
    /// Answers [`MetaReply::Changed`]: false when there was no such user.
    DeleteUser {
        name: String,
    },
    /// Answers [`MetaReply::Changed`]: false when the binding existed.
    AddAcl(AclBinding),
    /// Answers [`MetaReply::Changed`]: false when there was no such binding.
    RemoveAcl(AclBinding),
    /// Set a user's quotas (both `None` removes them).
    SetQuota {
        user: String,
        quota: crate::security::quota::UserQuota,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    /// For commands without a result, and for blank and membership entries.
    Done,
    TopicCreated(TopicRecord),
    ProducerId(u64),
    Topic(TopicRecord),
    /// For a decommission: the partitions ("topic/partition") that will move.
    Moving(Vec<String>),
    /// A node joined the metadata group.
    Joined {
        voter: bool,
    },
    /// A member's assignment, after a join or heartbeat.
    Assignment(Assignment),
    Error(MetaError),
    /// Whether a command changed anything (users and ACL bindings).
    Changed(bool),
    /// The leader's read index (see `MetaRequest::ReadIndex`).
    ReadIndex(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("topic \"{0}\" already exists")]
    TopicExists(String),
    #[error("topic \"{0}\" does not exist")]
    UnknownTopic(String),
    #[error("topic \"{topic}\" has {count} partitions; partition {partition} does not exist")]
    UnknownPartition { topic: String, partition: u32, count: u32 },
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    #[error("replication factor {replication_factor} exceeds the {nodes} nodes available")]
    NotEnoughNodes { replication_factor: u32, nodes: u32 },
    /// A move or decommission whose replicas would have nowhere to go.
    #[error("{0}")]
    NowhereToGo(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("consumer group \"{0}\" does not exist")]
    UnknownGroup(String),
    /// A stale member, or a partition the member does not own.
    #[error("{0}")]
    Fenced(String),
}

impl MetaCommand {
    pub fn encode(&self) -> Bytes {
        postcard::to_stdvec(self).expect("metadata commands always encode").into()
    }

    pub fn decode(b: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(b)
    }
}

impl MetaReply {
    pub fn encode(&self) -> Bytes {
        postcard::to_stdvec(self).expect("metadata replies always encode").into()
    }

    pub fn decode(b: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(b)
    }
}

impl From<Result<MetaReply, MetaError>> for MetaReply {
    fn from(r: Result<MetaReply, MetaError>) -> Self {
        r.unwrap_or_else(MetaReply::Error)
    }
}
