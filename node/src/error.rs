//! The broker's error type and its mapping to gRPC statuses.
//!
//! Every status carries a stable `eddy-error` code in its metadata (see `broker.proto`), and a
//! message that names the field or the reason, so both people and programs can act on it.

use eddy_proto::error_codes;
use eddy_proto::error_keys;
use eddy_raft::NodeId;
use tonic::Code;
use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::meta::MetaError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// An event or request over a size limit (an invalid argument to gRPC clients; Kafka
    /// clients get `MESSAGE_TOO_LARGE`).
    #[error("{0}")]
    TooLarge(String),
    #[error("topic \"{0}\" does not exist")]
    UnknownTopic(String),
    #[error("topic \"{topic}\" has {count} partitions; partition {partition} does not exist")]
    UnknownPartition { topic: String, partition: u32, count: u32 },
    #[error("topic \"{0}\" already exists")]
    TopicExists(String),
    /// This node does not lead the partition (or the metadata group).
    #[error("{what}: node {me} is not the leader{}", leader_hint(*.leader, .leader_addr))]
    NotLeader { what: String, me: NodeId, leader: Option<NodeId>, leader_addr: Option<String> },
    /// This node holds no replica of the partition.
    #[error("node {me} holds no replica of {what} (replicas: {replicas:?})")]
    NotReplica { what: String, me: NodeId, replicas: Vec<NodeId> },
    #[error("out-of-order sequence for producer {producer_id}: expected base_sequence {expected}, got {got}")]
    OutOfOrderSequence { producer_id: u64, expected: u64, got: u64 },
    /// The partition knows nothing of the producer (new and its first batch not yet written, or
    /// forgotten) and the batch does not start at sequence 0.
    #[error(
        "unknown producer {producer_id} on this partition: a first batch must start at sequence 0, got {got}"
    )]
    UnknownProducer { producer_id: u64, got: u64 },
    #[error("offset {offset} is below the log start offset {log_start} of {what}")]
    OffsetOutOfRange { what: String, offset: u64, log_start: u64 },
    #[error("{0}")]
    NotEnoughNodes(String),
    #[error("consumer group \"{0}\" does not exist")]
    UnknownGroup(String),
    /// A consumer-group member that is no longer a member, or a partition it does not own.
    #[error("{0}")]
    Fenced(String),
    /// The request conflicts with the cluster's state (e.g. a move already in progress).
    #[error("{0}")]
    Conflict(String),
    /// The outcome is unknown: the write may or may not have been applied. Idempotent producers
    /// retry with the same sequence.
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// No credentials, or credentials this node does not accept.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known and no ACL allows the operation.
    #[error("{0}")]
    PermissionDenied(String),
    /// The node's data disk is below its reserve: nothing was written; retry later or elsewhere.
    #[error("{0}")]
    DiskFull(String),
    /// Over a quota: nothing was done; retry after `retry_after_ms`.
    #[error("{message}")]
    Throttled { message: String, retry_after_ms: u64 },
}

fn leader_hint(leader: Option<NodeId>, addr: &Option<String>) -> String {
    match (leader, addr) {
        (Some(l), Some(a)) => format!("; the leader is node {l} at {a}"),
        (Some(l), None) => format!("; the leader is node {l}"),
        _ => "; the leader is not known yet".to_string(),
    }
}

impl BrokerError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) | Self::TooLarge(_) => error_codes::INVALID_ARGUMENT,
            Self::UnknownTopic(_) => error_codes::UNKNOWN_TOPIC,
            Self::UnknownPartition { .. } => error_codes::UNKNOWN_PARTITION,
            Self::TopicExists(_) => error_codes::TOPIC_EXISTS,
            Self::NotLeader { .. } => error_codes::NOT_LEADER,
            Self::NotReplica { .. } => error_codes::NOT_REPLICA,
            Self::OutOfOrderSequence { .. } => error_codes::OUT_OF_ORDER_SEQUENCE,
            Self::UnknownProducer { .. } => error_codes::UNKNOWN_PRODUCER,
            Self::OffsetOutOfRange { .. } => error_codes::OFFSET_OUT_OF_RANGE,
            Self::NotEnoughNodes(_) => error_codes::NOT_ENOUGH_NODES,
            Self::UnknownGroup(_) => error_codes::UNKNOWN_GROUP,
            Self::Fenced(_) => error_codes::FENCED,
            Self::Conflict(_) => error_codes::CONFLICT,
            Self::Timeout(_) => error_codes::TIMEOUT,
            Self::Unavailable(_) => error_codes::UNAVAILABLE,
            Self::Internal(_) => error_codes::INTERNAL,
            Self::Unauthenticated(_) => error_codes::UNAUTHENTICATED,
            Self::PermissionDenied(_) => error_codes::PERMISSION_DENIED,
            Self::Throttled { .. } => error_codes::THROTTLED,
            Self::DiskFull(_) => error_codes::DISK_FULL,
        }
    }

    fn grpc_code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) | Self::TooLarge(_) | Self::NotEnoughNodes(_) => Code::InvalidArgument,
            Self::UnknownTopic(_) | Self::UnknownPartition { .. } | Self::UnknownGroup(_) => Code::NotFound,
            Self::Fenced(_) => Code::FailedPrecondition,
            Self::TopicExists(_) => Code::AlreadyExists,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Throttled { .. } | Self::DiskFull(_) => Code::ResourceExhausted,
            Self::Conflict(_) => Code::FailedPrecondition,
            Self::NotLeader { .. }
            | Self::NotReplica { .. }
            | Self::OutOfOrderSequence { .. }
            | Self::UnknownProducer { .. } => Code::FailedPrecondition,
            Self::OffsetOutOfRange { .. } => Code::OutOfRange,
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        let mut status = Status::new(e.grpc_code(), e.to_string());
        let md = status.metadata_mut();
        md.insert(error_keys::CODE, MetadataValue::from_static(e.code()));
        if let BrokerError::NotLeader { leader, leader_addr, .. } = &e {
            if let Some(l) = leader {
                md.insert(error_keys::LEADER_ID, MetadataValue::from(*l));
            }
            if let Some(a) = leader_addr.as_deref().and_then(|a| MetadataValue::try_from(a).ok()) {
                md.insert(error_keys::LEADER_ADDR, a);
            }
        }
        if let BrokerError::Throttled { retry_after_ms, .. } = &e {
            md.insert(error_keys::RETRY_AFTER_MS, MetadataValue::from(*retry_after_ms));
        }
        if let BrokerError::OffsetOutOfRange { log_start, .. } = &e {
            md.insert(error_keys::LOG_START_OFFSET, MetadataValue::from(*log_start));
        }
        status
    }
}

/// The metadata state machine's refusals, as the client sees them.
impl From<MetaError> for BrokerError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::TopicExists(t) => Self::TopicExists(t),
            MetaError::NotEnoughNodes { replication_factor, nodes } => Self::NotEnoughNodes(format!(
                "replication_factor: {replication_factor} exceeds the {nodes} nodes in the cluster"
            )),
            MetaError::Invalid(m) => Self::InvalidArgument(m),
            MetaError::UnknownTopic(t) => Self::UnknownTopic(t),
            MetaError::UnknownPartition { topic, partition, count } => {
                Self::UnknownPartition { topic, partition, count }
            }
            MetaError::UnknownNode(n) => {
                Self::InvalidArgument(format!("node {n} is not a member of the cluster"))
            }
            MetaError::NowhereToGo(m) => Self::NotEnoughNodes(m),
            MetaError::Conflict(m) => Self::Conflict(m),
            MetaError::UnknownGroup(g) => Self::UnknownGroup(g),
            MetaError::Fenced(m) => Self::Fenced(m),
        }
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_names_the_leader_in_message_and_metadata() {
        let e = BrokerError::NotLeader {
            what: "orders/0".into(),
            me: 1,
            leader: Some(2),
            leader_addr: Some("127.0.0.1:9092".into()),
        };
        let s = Status::from(e);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("node 2 at 127.0.0.1:9092"), "{}", s.message());
        assert_eq!(s.metadata().get(error_keys::CODE).and_then(|v| v.to_str().ok()), Some("not_leader"));
        assert_eq!(s.metadata().get(error_keys::LEADER_ID).and_then(|v| v.to_str().ok()), Some("2"));
    }

    #[test]
    fn out_of_range_names_the_offset_and_the_log_start() {
        let s = Status::from(BrokerError::OffsetOutOfRange {
            what: "orders/0".into(),
            offset: 0,
            log_start: 1234,
        });
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(s.message(), "offset 0 is below the log start offset 1234 of orders/0");
        let md = s.metadata();
        assert_eq!(md.get(error_keys::CODE).and_then(|v| v.to_str().ok()), Some("offset_out_of_range"));
        assert_eq!(md.get(error_keys::LOG_START_OFFSET).and_then(|v| v.to_str().ok()), Some("1234"));
    }
}
