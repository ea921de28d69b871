//! [`LogStore`]: openraft's `RaftLogStorage` over [`Segments`], with group commit.
//!
//! `append` writes entries into the page cache and hands openraft's completion callback to the
//! group's flusher task. The flusher drains every callback queued so far, syncs every file
//! written so far with one `fdatasync` each, and only then completes the callbacks. Appends that
//! arrive while a sync runs share the next one. openraft counts an entry toward a commit quorum
//! only after its callback completes, so an acknowledged event is always on a quorum's disks.
//!
//! An `fdatasync` failure is fatal for the group: the flusher fails every later callback too,
//! because after a failed sync the kernel may have dropped the dirty pages (the "fsyncgate"
//! lesson), and retrying would report data durable that is not.

use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::storage::IOFlushed;
use openraft::storage::LogState;
use openraft::storage::RaftLogStorage;
use tokio::sync::mpsc;
use tracing::error;
use tracing::warn;

use super::segments::RecoveryReport;
use super::segments::SegmentInfo;
use super::segments::Segments;
use super::state_file;
use super::state_file::StateFile;
use crate::types::C;
use crate::types::Entry;
use crate::types::LogId;
use crate::types::Vote;
use crate::vfs::Vfs;

/// Appends queued for the flusher before `append` waits.
const FLUSH_QUEUE_MAX: usize = 4096;
/// How often an append blocked by a full disk tries again.
const DISK_FULL_RETRY: Duration = Duration::from_millis(250);
/// Upper bound on the bytes one replication read returns.
pub const REPLICATION_READ_BYTES_MAX: usize = 8 << 20;

/// Told how long each group-commit sync took (for the fsync latency metric).
pub type SyncObserver = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

/// Told when the log could not make its writes durable (a failed `fdatasync`: the kernel may
/// already have dropped what it was to persist), or found an entry damaged on disk when it
/// read it (a checksum that does not match): the node stops either way.
pub type FailureObserver = Arc<dyn Fn(&str) + Send + Sync>;

/// Settings of one group's log.
#[derive(Clone)]
pub struct LogConfig {
    /// A segment is closed and a new one started once it would grow past this.
    pub segment_bytes_max: u64,
    pub on_sync: Option<SyncObserver>,
    pub on_failure: Option<FailureObserver>,
    /// Planted bug `disk-full-ignored` (simulator only): an append that meets a full disk is
    /// reported done although nothing was written.
    #[cfg(feature = "planted-bugs")]
    pub ignore_disk_full: bool,
    /// Planted bug `fsync-failure-ignored` (simulator only): a failed `fdatasync` is taken for
    /// a good one, as databases did before "fsyncgate".
    #[cfg(feature = "planted-bugs")]
    pub ignore_fsync_failure: bool,
    /// Planted bug `corrupt-record-served` (simulator only): frames' checksums are not checked,
    /// so a corrupted byte is read (and served) as data.
    #[cfg(feature = "planted-bugs")]
    pub ignore_corruption: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: 64 << 20,
            on_sync: None,
            on_failure: None,
            #[cfg(feature = "planted-bugs")]
            ignore_disk_full: false,
            #[cfg(feature = "planted-bugs")]
            ignore_fsync_failure: false,
            #[cfg(feature = "planted-bugs")]
            ignore_corruption: false,
        }
    }
}

impl std::fmt::Debug for LogConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogConfig")
            .field("segment_bytes_max", &self.segment_bytes_max)
            .finish_non_exhaustive()
    }
}

struct Shared {
    segments: RwLock<Segments>,
    vote: RwLock<Option<Vote>>,
    /// One past the last index known to be on disk: recovered entries, then what each
    /// successful sync covered. Lowered by a truncation.
    durable_end: tokio::sync::watch::Sender<u64>,
    /// Told when a read finds a damaged entry.
    on_failure: Option<FailureObserver>,
    /// The lowest `durable_end` a truncation set since the flusher last took the dirty files:
    /// a sync under way makes durable no more than what survived the truncation.
    cut_since_take: std::sync::Mutex<u64>,
}

/// The log of one Raft group.
pub struct LogStore {
    shared: Arc<Shared>,
    state: StateFile,
    flush_tx: mpsc::Sender<IOFlushed<C>>,
    on_failure: Option<FailureObserver>,
    #[cfg(feature = "planted-bugs")]
    ignore_disk_full: bool,
}

/// A cheap, cloneable reader of a [`LogStore`]; also what fetches read records through.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir` and starts its flusher. The flusher stops when the
    /// store is dropped.
    pub async fn open(
        vfs: Arc<dyn Vfs>,
        dir: &Path,
        config: LogConfig,
    ) -> io::Result<(Self, RecoveryReport)> {
        vfs.create_dir_all(dir)?;
        let state = StateFile::open(vfs.as_ref(), dir).await?;
        #[cfg(feature = "planted-bugs")]
        let verify = !config.ignore_corruption;
        #[cfg(not(feature = "planted-bugs"))]
        let verify = true;
        let (segments, report) =
            Segments::recover(vfs.clone(), dir, config.segment_bytes_max, state.state().last_purged, verify)
                .await?;
        if let Some(reason) = &report.reason {
            warn!(dir = %dir.display(), truncated_bytes = report.truncated_bytes, "cut the log's tail on recovery: {reason}");
        }
        let recovered_end = segments.last_log_id().map_or(0, |l| l.index + 1);
        let shared = Arc::new(Shared {
            segments: RwLock::new(segments),
            vote: RwLock::new(state.state().vote),
            durable_end: tokio::sync::watch::Sender::new(recovered_end),
            on_failure: config.on_failure.clone(),
            cut_since_take: std::sync::Mutex::new(u64::MAX),
        });
        let (flush_tx, flush_rx) = mpsc::channel(FLUSH_QUEUE_MAX);
        #[cfg(feature = "planted-bugs")]
        let ignore_fsync_failure = config.ignore_fsync_failure;
        #[cfg(not(feature = "planted-bugs"))]
        let ignore_fsync_failure = false;
        let observers = (config.on_sync.clone(), config.on_failure.clone());
        tokio::spawn(flusher(flush_rx, shared.clone(), observers, ignore_fsync_failure));
        Ok((
            Self {
                shared,
                state,
                flush_tx,
                on_failure: config.on_failure.clone(),
                #[cfg(feature = "planted-bugs")]
                ignore_disk_full: config.ignore_disk_full,
            },
            report,
        ))
    }

    pub fn reader(&self) -> LogReader {
        LogReader { shared: self.shared.clone() }
    }

    /// True if the log holds no vote and no entry: a group never started on this node.
    pub fn is_pristine(&self) -> bool {
        let st = self.state.state();
        st.vote.is_none() && st.last_purged.is_none() && self.reader().last_log_id().is_none()
    }
}

async fn flusher(
    mut rx: mpsc::Receiver<IOFlushed<C>>,
    shared: Arc<Shared>,
    (on_sync, on_failure): (Option<SyncObserver>, Option<FailureObserver>),
    ignore_failure: bool,
) {
    let mut failed: Option<String> = None;
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < FLUSH_QUEUE_MAX {
            match rx.try_recv() {
                Ok(cb) => batch.push(cb),
                Err(_) => break,
            }
        }
        if failed.is_none() {
            let (files, dir, end) = {
                let mut segs = shared.segments.write().expect("log lock poisoned");
                *shared.cut_since_take.lock().expect("cut lock poisoned") = u64::MAX;
                let end = segs.last_log_id().map_or(0, |l| l.index + 1);
                let (files, dir) = segs.take_dirty();
                (files, dir, end)
            };
            let started = tokio::time::Instant::now();
            let result = async {
                for f in files {
                    f.sync_data().await?;
                }
                if let Some((vfs, dir)) = dir {
                    vfs.sync_dir(&dir).await?;
                }
                Ok::<(), io::Error>(())
            }
            .await;
            if let Some(observe) = &on_sync {
                observe(started.elapsed());
            }
            let synced = match result {
                Ok(()) => true,
                Err(e) if ignore_failure => {
                    warn!("log fsync failed (planted bug: taken as done): {e}");
                    true
                }
                Err(e) => {
                    let dir = shared.segments.read().expect("log lock poisoned").dir().to_owned();
                    let msg = format!("log fsync failed in {}: {e}", dir.display());
                    error!("{msg}; the group stops accepting writes");
                    if let Some(fail) = &on_failure {
                        fail(&msg);
                    }
                    failed = Some(e.to_string());
                    false
                }
            };
            if synced {
                let end = end.min(*shared.cut_since_take.lock().expect("cut lock poisoned"));
                shared.durable_end.send_if_modified(|d| {
                    let raise = end > *d;
                    *d = (*d).max(end);
                    raise
                });
            }
        }
        for cb in batch.drain(..) {
            match &failed {
                None => cb.io_completed(Ok(())),
                Some(msg) => {
                    cb.io_completed(Err(io::Error::other(format!("log fsync failed earlier: {msg}"))))
                }
            }
        }
    }
}

impl Shared {
    /// Passes a read's result on, reporting a damaged entry (`InvalidData`: a checksum that
    /// does not match, an entry at the wrong place) to `on_failure`: the entry is never served,
    /// and the node stops, as for a failed sync. Restarted, its recovery refuses this log
    /// (see [`Segments::recover`]) and the node serves its other replicas.
    fn checked(&self, segs: &Segments, read: io::Result<Vec<Entry>>) -> io::Result<Vec<Entry>> {
        if let Err(e) = &read
            && e.kind() == io::ErrorKind::InvalidData
        {
            let msg = format!("the log in {} is damaged: {e}", segs.dir().display());
            error!("{msg}");
            if let Some(fail) = &self.on_failure {
                fail(&msg);
            }
        }
        read
    }
}

impl LogReader {
    /// Waits until the entry at `index` is on this replica's disk. A state machine applies an
    /// entry only then: openraft applies what the cluster committed once it is in the local
    /// log, synced or not, and a state store that persisted an entry the log then lost (a
    /// power loss, a failed sync) would be ahead of its log on restart, which openraft takes
    /// for a purge, discarding the whole log below it.
    pub async fn wait_durable(&self, index: u64) {
        // Every applied entry asks: the common case (already synced) takes no subscription.
        if *self.shared.durable_end.borrow() > index {
            return;
        }
        let mut rx = self.shared.durable_end.subscribe();
        // Fails only if the sender is gone, which the shared state outlives.
        let _ = rx.wait_for(|end| *end > index).await;
    }

    pub fn last_log_id(&self) -> Option<LogId> {
        self.shared.segments.read().expect("log lock poisoned").last_log_id()
    }

    pub fn first_index(&self) -> Option<u64> {
        self.shared.segments.read().expect("log lock poisoned").first_index()
    }

    /// Reads entries in `[start, end)`, at least one and about `bytes_max` bytes at most.
    pub fn read(&self, start: u64, end: u64, bytes_max: usize) -> io::Result<Vec<Entry>> {
        let segs = self.shared.segments.read().expect("log lock poisoned");
        self.shared.checked(&segs, segs.read(start, end, bytes_max))
    }

    /// Bytes in the log's segment files.
    pub fn bytes(&self) -> u64 {
        self.shared.segments.read().expect("log lock poisoned").bytes()
    }

    /// The segment files, oldest first (the last is the active one).
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.shared.segments.read().expect("log lock poisoned").infos()
    }

    /// Changes the segment size of this log (a topic's `segment.bytes` was altered).
    pub fn set_segment_bytes_max(&self, bytes: u64) {
        self.shared.segments.write().expect("log lock poisoned").set_segment_bytes_max(bytes);
    }
}

fn to_range(range: impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e + 1,
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<C> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = to_range(range);
        let segs = self.shared.segments.read().expect("log lock poisoned");
        // openraft may ask beyond the ends; return the part that exists.
        let first = segs.first_index().unwrap_or(u64::MAX);
        let last_next = segs.last_log_id().map_or(0, |l| l.index + 1);
        let (start, end) = (start.max(first), end.min(last_next));
        self.shared.checked(&segs, segs.read(start, end, usize::MAX))
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        let segs = self.shared.segments.read().expect("log lock poisoned");
        // The replication task of a leader that has just stepped down may still ask for entries
        // its log no longer holds at the end (the new leader's entries truncated them). openraft
        // takes an empty answer as a heartbeat, but an error as a storage failure that stops the
        // whole group for good (simulator seed 35 with `--partitions 100`: a replica died this
        // way and its node served its partition stale from then on). Entries missing at the
        // start (purged) stay an error: openraft sends a snapshot instead of reading those.
        let last_next = segs.last_log_id().map_or(0, |l| l.index + 1);
        self.shared.checked(&segs, segs.read(start, end.min(last_next), REPLICATION_READ_BYTES_MAX))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(*self.shared.vote.read().expect("vote lock poisoned"))
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let segs = self.shared.segments.read().expect("log lock poisoned");
        Ok(LogState { last_purged_log_id: segs.last_purged(), last_log_id: segs.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut st = self.state.state().clone();
        st.vote = Some(*vote);
        if let Err(e) = self.state.save(st).await {
            // A full disk was waited out inside `save`: this is a failed write or sync.
            if let Some(fail) = &self.on_failure {
                let dir = self.shared.segments.read().expect("log lock poisoned").dir().to_owned();
                fail(&format!("saving the vote in {} failed: {e}", dir.display()));
            }
            return Err(e);
        }
        *self.shared.vote.write().expect("vote lock poisoned") = Some(*vote);
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // A full disk is waited out, not returned: openraft takes a storage error as fatal and
        // stops the group for good. The append wrote nothing (see `Segments::append`) and
        // acknowledges nothing while it waits; to the group this replica is slow, as a paused
        // one is, and it catches up once space is freed.
        let mut waited = Duration::ZERO;
        loop {
            let r = {
                let mut segs = self.shared.segments.write().expect("log lock poisoned");
                if segs.vfs().space_low() {
                    Err(io::Error::new(io::ErrorKind::StorageFull, "space is below the node's reserve"))
                } else {
                    segs.append(&entries)
                }
            };
            match r {
                Ok(()) => break,
                #[cfg(feature = "planted-bugs")]
                Err(e) if self.ignore_disk_full && crate::vfs::is_disk_full(&e) => break,
                Err(e) if crate::vfs::is_disk_full(&e) => {
                    if waited.as_millis().is_multiple_of(30_000) {
                        let dir = self.shared.segments.read().expect("log lock poisoned").dir().to_owned();
                        warn!(dir = %dir.display(), error = %e, waited_s = waited.as_secs(),
                            "disk full: the log cannot append; waiting for space (writes resume once it is freed)");
                    }
                    tokio::time::sleep(DISK_FULL_RETRY).await;
                    waited += DISK_FULL_RETRY;
                }
                Err(e) => return Err(e),
            }
        }
        self.flush_tx.send(callback).await.map_err(|_| io::Error::other("log flusher stopped"))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let (files, removed, vfs, dir) = {
            let mut segs = self.shared.segments.write().expect("log lock poisoned");
            let (files, removed) = segs.truncate_after(last_log_id)?;
            let end = last_log_id.map_or(0, |l| l.index + 1);
            let mut cut = self.shared.cut_since_take.lock().expect("cut lock poisoned");
            *cut = (*cut).min(end);
            self.shared.durable_end.send_if_modified(|d| {
                let lower = end < *d;
                *d = (*d).min(end);
                lower
            });
            (files, removed, segs.vfs().clone(), segs.dir().to_owned())
        };
        for f in files {
            f.sync_data().await?;
        }
        if removed {
            vfs.sync_dir(&dir).await?;
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point durably before deleting anything, so recovery never finds a
        // log that starts later than the state says.
        let mut st: state_file::LogState = self.state.state().clone();
        if st.last_purged.is_some_and(|p| p >= log_id) {
            return Ok(());
        }
        st.last_purged = Some(log_id);
        self.state.save(st).await?;
        let (removed, vfs, dir) = {
            let mut segs = self.shared.segments.write().expect("log lock poisoned");
            let removed = segs.purge(log_id)?;
            (removed, segs.vfs().clone(), segs.dir().to_owned())
        };
        if removed {
            vfs.sync_dir(&dir).await?;
        }
        Ok(())
    }
}
