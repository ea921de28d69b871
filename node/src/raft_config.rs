//! openraft settings for Eddy's two kinds of group.
//!
//! The metadata group uses openraft's own timers: it is one group per cluster and everything
//! waits on it. Partition groups have no timers at all (`enable_tick = false`): an idle group
//! costs nothing, and their heartbeats and elections are driven by node liveness
//! (`eddy_raft::liveness`), so a thousand partitions fail over as fast as one.

use std::sync::Arc;

use openraft::Config;
use openraft::SnapshotPolicy;

/// Entries per replication message; large batches keep followers close behind.
const PAYLOAD_ENTRIES_MAX: u64 = 512;

fn base(name: &str) -> Config {
    Config {
        cluster_name: name.to_string(),
        max_payload_entries: PAYLOAD_ENTRIES_MAX,
        // A node that was partitioned away must not disrupt a healthy leader when it returns.
        enable_pre_vote: Some(true),
        // Committed ids are not persisted, so a restarted leader must win a new election.
        enable_leader_restore: Some(false),
        ..Default::default()
    }
}

pub fn metadata_group() -> Arc<Config> {
    let c = Config {
        heartbeat_interval: 100,
        heartbeat_min_interval: Some(100),
        election_timeout_min: 600,
        election_timeout_max: 1200,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(5000),
        max_in_snapshot_log_to_keep: 1000,
        ..base("eddy-metadata")
    };
    Arc::new(c.validate().expect("metadata group config is valid"))
}

pub fn partition_group() -> Arc<Config> {
    let c = Config {
        // No ticker: no heartbeat and no election timer per group. `GroupWatch` triggers
        // elections when node liveness says a leader is gone, and heartbeats when a follower's
        // node comes back. The timeouts below only size openraft's leader lease (the maximum):
        // a follower that heard from its leader within it refuses to vote for another.
        enable_tick: false,
        // Also the deadline of each heartbeat RPC (the lease renewals of `PartitionHandle::write`
        // are heartbeat rounds): at 100 ms, a node renewing a thousand leases at once timed most
        // of them out.
        heartbeat_interval: 250,
        heartbeat_min_interval: Some(50),
        election_timeout_min: 400,
        election_timeout_max: 500,
        // The partition log is the data: it is only ever purged by retention, which builds a
        // snapshot of the partition state first. openraft never snapshots or purges on its own.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: u64::MAX / 4,
        replication_lag_threshold: u64::MAX / 4,
        ..base("eddy-partition")
    };
    Arc::new(c.validate().expect("partition group config is valid"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn configs_validate() {
        let m = super::metadata_group();
        let p = super::partition_group();
        assert!(m.enable_tick, "the metadata group keeps its own timers");
        assert!(!p.enable_tick, "partition groups are driven by node liveness");
        assert!(
            p.election_timeout_max < eddy_raft::liveness::DOWN_AFTER.as_millis() as u64,
            "a follower's lease on a dead leader ends before liveness judges the leader down"
        );
    }
}
