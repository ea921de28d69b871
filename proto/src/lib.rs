//! Eddy's wire types: the generated protobuf messages and gRPC services, and the few pure
//! helpers that client and server must compute identically.

#![allow(clippy::all, clippy::pedantic)]

/// Generated code for package `eddy.v1`.
pub mod v1 {
    tonic::include_proto!("eddy.v1");
}

/// The encoded `FileDescriptorSet` of every Eddy service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/eddy_descriptor.bin"));

/// Version of the payload encoding inside `RaftRequest`/`RaftReply`.
pub const RAFT_WIRE_VERSION: u32 = 1;

/// Metadata keys a status may carry (see `broker.proto`).
pub mod error_keys {
    pub const CODE: &str = "eddy-error";
    pub const LEADER_ID: &str = "eddy-leader-id";
    pub const LEADER_ADDR: &str = "eddy-leader-addr";
    /// With `offset_out_of_range`: the log start offset of the replica that answered.
    pub const LOG_START_OFFSET: &str = "eddy-log-start-offset";
    /// With `throttled`: milliseconds to wait before retrying.
    pub const RETRY_AFTER_MS: &str = "eddy-retry-after-ms";
}

/// The stable error codes a status carries under [`error_keys::CODE`]: the server sets them and
/// clients act on them, so both take them from here. Never match on an error's message.
pub mod error_codes {
    /// The request is malformed; the message names the field.
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    pub const UNKNOWN_TOPIC: &str = "unknown_topic";
    pub const UNKNOWN_PARTITION: &str = "unknown_partition";
    pub const TOPIC_EXISTS: &str = "topic_exists";
    /// This node does not lead the partition or the metadata group; `eddy-leader-id` and `eddy-leader-addr` name the leader when known.
    pub const NOT_LEADER: &str = "not_leader";
    /// This node holds no replica of the partition.
    pub const NOT_REPLICA: &str = "not_replica";
    /// A batch whose base sequence does not follow the producer's last batch on the partition.
    pub const OUT_OF_ORDER_SEQUENCE: &str = "out_of_order_sequence";
    /// The partition does not know the producer, and its batch does not start at sequence 0.
    pub const UNKNOWN_PRODUCER: &str = "unknown_producer";
    /// Below the log start offset; `eddy-log-start-offset` says where the log starts.
    pub const OFFSET_OUT_OF_RANGE: &str = "offset_out_of_range";
    pub const NOT_ENOUGH_NODES: &str = "not_enough_nodes";
    /// No consumer group of that name.
    pub const UNKNOWN_GROUP: &str = "unknown_group";
    /// A consumer-group member that is no longer a member, or a partition it does not own.
    pub const FENCED: &str = "fenced";
    /// The request conflicts with the cluster's state (a move already in progress, say).
    pub const CONFLICT: &str = "conflict";
    /// The outcome is unknown: the write may or may not have been applied.
    pub const TIMEOUT: &str = "timeout";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const INTERNAL: &str = "internal";
    /// No credentials, or credentials the node does not accept (gRPC `UNAUTHENTICATED`).
    pub const UNAUTHENTICATED: &str = "unauthenticated";
    /// The caller is known but no ACL allows the operation (gRPC `PERMISSION_DENIED`).
    pub const PERMISSION_DENIED: &str = "permission_denied";
    /// Over a quota; nothing was done. `eddy-retry-after-ms` says when to retry.
    pub const THROTTLED: &str = "throttled";
    /// The node's data disk is below its reserve (`storage_min_free_bytes`); nothing was
    /// written. Retriable: the node hands its leaderships over, and writes resume once space is
    /// freed.
    pub const DISK_FULL: &str = "disk_full";
}

pub mod credentials;

/// The partition a keyed record goes to when the producer does not name one.
///
/// Client and server must agree on this function, which is why it lives here. It is xxh3 of the
/// key bytes, modulo the partition count: stable across versions and platforms.
pub fn partition_for_key(key: &[u8], n_partitions: u32) -> u32 {
    assert!(n_partitions > 0, "a topic has at least one partition");
    (xxhash_rust::xxh3::xxh3_64(key) % u64::from(n_partitions)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_for_key_is_stable_and_in_range() {
        // Pinned values: changing the hash would move every keyed record of existing topics.
        assert_eq!(partition_for_key(b"order-1", 1), 0);
        let p = partition_for_key(b"order-1", 12);
        assert!(p < 12);
        assert_eq!(p, partition_for_key(b"order-1", 12));
        let spread: std::collections::BTreeSet<u32> =
            (0..200).map(|i| partition_for_key(format!("k{i}").as_bytes(), 8)).collect();
        assert_eq!(spread.len(), 8, "200 keys should reach all 8 partitions");
    }
}
