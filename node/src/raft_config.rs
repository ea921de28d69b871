//! openraft settings for Eddy's two kinds of group.
//!
//! The metadata group uses fast timers: it is one group per cluster and everything waits on it.
//! Partition groups use slower timers (heartbeat 250 ms, election 1–2 s) so that hundreds of
//! them per node stay cheap; a partition's failover still completes within a few seconds.

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
        heartbeat_interval: 250,
        // A follower that acknowledged replication recently needs no heartbeat: under load
        // this removes most heartbeat RPCs (interval + this + a tick < election timeout).
        heartbeat_min_interval: Some(250),
        election_timeout_min: 1000,
        election_timeout_max: 2000,
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
        assert!(p.election_timeout_min > m.election_timeout_min);
        assert!(p.heartbeat_interval > m.heartbeat_interval);
    }
}
