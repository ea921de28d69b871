//! Disk space. A node whose data disk has less than `storage_min_free_bytes` available refuses
//! new writes with an error naming the cause (`disk_full`; Kafka `KAFKA_STORAGE_ERROR`), hands
//! the leaderships it holds to other replicas, and keeps serving reads. Its replicas' log appends
//! (a follower's included) wait for space (`Vfs::set_space_low`, `eddy_raft::log::LogStore`), so
//! each group goes on without this replica and the reserve stays for the state store, votes and
//! the node's own bookkeeping; an append that meets a full disk anyway writes nothing and waits
//! too. The replicas catch up once space is freed, and writes resume on their own when space
//! comes back above the reserve.
//!
//! A disk filled to the last byte at once (by another process, faster than the check) can still
//! fail a state-store write; sled then refuses every later write, and the groups whose state
//! machine fails stop until the node restarts. The reserve is the defence; see the README.
//!
//! A write the disk could not make durable (a failed `fdatasync` of a log or a vote) stops the
//! whole node ([`StorageFailure`]): after a failed sync the kernel may have dropped the pages
//! it was to persist and a retry can report success for data that is gone (the "fsyncgate"
//! lesson), so the node never retries. It hands its leaderships over, stops, and the process
//! exits naming the failure; started again, it recovers from what the disk holds, as after a
//! power loss, and its peers repair the rest.
//!
//! An entry found damaged when it is read (its checksum does not match: a corrupted byte on
//! disk) stops the node the same way, before the entry is served or replicated. Started again,
//! the node's recovery refuses that replica's log (a bad entry with intact entries after it is
//! damage, not a torn write), reports it (`eddy_replicas_damaged`, the log), and serves its
//! other replicas; the operator moves the damaged replica to another node, whose new replica
//! the leader fills from the healthy ones. See `ARCHITECTURE.md`, "Disk faults".
//!
//! The reserve is checked once a second (`DiskSpace::refresh`), as Redpanda's
//! `storage_min_free_bytes`: a request between two checks may still be written, which is what
//! the reserve is for.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use eddy_raft::NodeId;
use eddy_raft::vfs::Vfs;
use tracing::info;
use tracing::warn;

use crate::error::BrokerError;

/// The node's fail-stop latch: set by the first write the disk could not make durable; the
/// node stops once it is set (see the module's documentation).
#[derive(Clone, Default)]
pub struct StorageFailure {
    reason: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    set: tokio_util::sync::CancellationToken,
}

impl StorageFailure {
    /// Records the first failure and wakes whoever waits in [`StorageFailure::wait`].
    pub fn fail(&self, why: &str) {
        let mut reason = self.reason.lock().expect("storage failure lock");
        if reason.is_none() {
            tracing::error!("{why}: the node stops (see `node/src/disk.rs`)");
            *reason = Some(why.to_owned());
        }
        self.set.cancel();
    }

    /// The observer the logs report failures to.
    pub fn observer(&self) -> eddy_raft::log::FailureObserver {
        let me = self.clone();
        std::sync::Arc::new(move |why: &str| me.fail(why))
    }

    /// Waits for the first failure and returns it.
    pub async fn wait(&self) -> String {
        self.set.cancelled().await;
        self.reason.lock().expect("storage failure lock").clone().unwrap_or_default()
    }
}

pub struct DiskSpace {
    me: NodeId,
    dir: PathBuf,
    min_free: u64,
    available: AtomicU64,
    full: AtomicBool,
}

impl DiskSpace {
    pub fn new(me: NodeId, dir: PathBuf, min_free: u64) -> Self {
        Self { me, dir, min_free, available: AtomicU64::new(u64::MAX), full: AtomicBool::new(false) }
    }

    /// Reads the space available now; returns whether the disk is below the reserve.
    pub fn refresh(&self, vfs: &dyn Vfs) -> bool {
        let available = match vfs.available_bytes(&self.dir) {
            Ok(a) => a,
            Err(e) => {
                warn!(dir = %self.dir.display(), "cannot read the space available: {e}");
                return self.is_full();
            }
        };
        self.available.store(available, Ordering::Relaxed);
        let full = available < self.min_free;
        vfs.set_space_low(full);
        let was = self.full.swap(full, Ordering::Relaxed);
        if full && !was {
            warn!(
                dir = %self.dir.display(), available, min_free = self.min_free,
                "disk full: refusing writes and handing leaderships over until space is freed"
            );
        } else if was && !full {
            info!(dir = %self.dir.display(), available, "disk space freed: accepting writes again");
        }
        full
    }

    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    pub fn available(&self) -> u64 {
        self.available.load(Ordering::Relaxed)
    }

    /// The error for a write refused because the disk is full, or `Ok`.
    pub fn check_writable(&self) -> Result<(), BrokerError> {
        if !self.is_full() {
            return Ok(());
        }
        Err(BrokerError::DiskFull(format!(
            "disk full on node {}: {} bytes available in {}, below storage_min_free_bytes ({}); \
             writes resume once space is freed",
            self.me,
            self.available(),
            self.dir.display(),
            self.min_free
        )))
    }
}
