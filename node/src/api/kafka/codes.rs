//! Kafka's error codes that this listener answers with, and how Eddy's errors map onto them.

use crate::error::BrokerError;

pub const NONE: i16 = 0;
pub const UNKNOWN_SERVER_ERROR: i16 = -1;
pub const OFFSET_OUT_OF_RANGE: i16 = 1;
pub const CORRUPT_MESSAGE: i16 = 2;
pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
pub const LEADER_NOT_AVAILABLE: i16 = 5;
pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
pub const REQUEST_TIMED_OUT: i16 = 7;
pub const MESSAGE_TOO_LARGE: i16 = 10;
pub const OFFSET_METADATA_TOO_LARGE: i16 = 12;
pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
pub const NOT_COORDINATOR: i16 = 16;
pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
pub const RECORD_LIST_TOO_LARGE: i16 = 18;
pub const INVALID_REQUIRED_ACKS: i16 = 21;
pub const ILLEGAL_GENERATION: i16 = 22;
pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
pub const INVALID_GROUP_ID: i16 = 24;
pub const UNKNOWN_MEMBER_ID: i16 = 25;
pub const INVALID_SESSION_TIMEOUT: i16 = 26;
pub const REBALANCE_IN_PROGRESS: i16 = 27;
pub const UNSUPPORTED_VERSION: i16 = 35;
pub const TOPIC_ALREADY_EXISTS: i16 = 36;
pub const INVALID_PARTITIONS: i16 = 37;
pub const INVALID_REPLICATION_FACTOR: i16 = 38;
pub const INVALID_CONFIG: i16 = 40;
pub const INVALID_REQUEST: i16 = 42;
pub const UNSUPPORTED_FOR_MESSAGE_FORMAT: i16 = 43;
pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
pub const UNKNOWN_PRODUCER_ID: i16 = 59;
pub const GROUP_MAX_SIZE_REACHED: i16 = 81;
pub const MEMBER_ID_REQUIRED: i16 = 79;
pub const GROUP_ID_NOT_FOUND: i16 = 69;
pub const UNSUPPORTED_COMPRESSION_TYPE: i16 = 76;
pub const INVALID_RECORD: i16 = 87;
pub const UNKNOWN_TOPIC_ID: i16 = 100;
pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
pub const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
pub const ILLEGAL_SASL_STATE: i16 = 34;
pub const SASL_AUTHENTICATION_FAILED: i16 = 58;
pub const THROTTLING_QUOTA_EXCEEDED: i16 = 89;
/// Retriable in Kafka's clients: the broker cannot write to its log directory now.
pub const KAFKA_STORAGE_ERROR: i16 = 56;

/// The Kafka error code for an error of Eddy's services. Retriable conditions map to Kafka's
/// retriable codes (a client refreshes its metadata on `NOT_LEADER_OR_FOLLOWER` and retries).
pub fn code(e: &BrokerError) -> i16 {
    match e {
        BrokerError::InvalidArgument(_) | BrokerError::Conflict(_) => INVALID_REQUEST,
        BrokerError::TooLarge(_) => MESSAGE_TOO_LARGE,
        BrokerError::UnknownTopic(_) | BrokerError::UnknownPartition { .. } => UNKNOWN_TOPIC_OR_PARTITION,
        BrokerError::TopicExists(_) => TOPIC_ALREADY_EXISTS,
        BrokerError::NotLeader { .. } | BrokerError::NotReplica { .. } => NOT_LEADER_OR_FOLLOWER,
        BrokerError::OutOfOrderSequence { .. } => OUT_OF_ORDER_SEQUENCE_NUMBER,
        BrokerError::UnknownProducer { .. } => UNKNOWN_PRODUCER_ID,
        BrokerError::OffsetOutOfRange { .. } => OFFSET_OUT_OF_RANGE,
        BrokerError::NotEnoughNodes(_) => INVALID_REPLICATION_FACTOR,
        BrokerError::UnknownGroup(_) => GROUP_ID_NOT_FOUND,
        BrokerError::Timeout(_) => REQUEST_TIMED_OUT,
        BrokerError::Unavailable(_) => LEADER_NOT_AVAILABLE,
        BrokerError::Fenced(_) | BrokerError::Internal(_) => UNKNOWN_SERVER_ERROR,
        BrokerError::PermissionDenied(_) => TOPIC_AUTHORIZATION_FAILED,
        BrokerError::Unauthenticated(_) => SASL_AUTHENTICATION_FAILED,
        BrokerError::Throttled { .. } => THROTTLING_QUOTA_EXCEEDED,
        BrokerError::DiskFull(_) => KAFKA_STORAGE_ERROR,
    }
}
