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
}

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
