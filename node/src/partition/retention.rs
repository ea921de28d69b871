//! Retention: every replica of a partition runs a [`RetentionTask`]. On the leader of a topic
//! with a retention limit it decides, every `retention_check_interval_ms`, how far the topic's `retention.ms` and `retention.bytes`
//! let the log start advance ([`new_log_start`]) and proposes `AdvanceLogStart` through Raft, so
//! every replica forgets the same records. On every replica it then purges the Raft log below
//! the first record kept: openraft purges only what a snapshot covers, so the task builds a
//! snapshot (the partition state, no records) first.
//!
//! Retention deletes whole segments of the leader's log. Followers roll their segments at other
//! entries, so a follower frees a segment once the purge point passes its end.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use eddy_raft::log::SegmentInfo;
use openraft::async_runtime::WatchReceiver;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tracing::info;
use tracing::warn;

use super::handle::PartitionHandle;
use super::state::IndexEntry;
use super::state::IndexScan;
use crate::env::Clock;
use crate::env::SteadyClock;
use crate::meta::state::TopicRecord;

/// How long the leader waits for an `AdvanceLogStart` to commit.
const ADVANCE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a replica waits for the snapshot that lets it purge.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

/// The topic settings a replica's retention task acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicSettings {
    pub policy: RetentionPolicy,
    pub segment_bytes: Option<u64>,
}

impl TopicSettings {
    pub fn of(topic: &TopicRecord) -> Self {
        Self { policy: RetentionPolicy::of(topic), segment_bytes: topic.segment_bytes() }
    }
}

/// A topic's retention settings; `None` keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub retention_ms: Option<i64>,
    pub retention_bytes: Option<u64>,
}

impl RetentionPolicy {
    pub fn of(topic: &TopicRecord) -> Self {
        Self { retention_ms: topic.retention_ms(), retention_bytes: topic.retention_bytes() }
    }

    pub fn is_unlimited(&self) -> bool {
        self.retention_ms.is_none() && self.retention_bytes.is_none()
    }
}

/// Where the log may start now: the base offset of the first batch of the oldest segment that
/// must be kept, or `None` if no segment can go.
///
/// `segments` are the leader's segment files, oldest first; the last is active and always kept.
/// A segment can go when it and every older one can: by time, when every batch in it has a
/// greatest timestamp before `now_ms - retention_ms` (an unknown timestamp keeps it); by size,
/// while the segments kept would otherwise exceed `retention_bytes`. `batches()` iterates the
/// offset index from the current log start; it is read only as far as the decision needs.
pub fn new_log_start<I>(
    segments: &[SegmentInfo],
    mut batches: impl FnMut() -> I,
    high_watermark: u64,
    now_ms: i64,
    policy: RetentionPolicy,
) -> io::Result<Option<u64>>
where
    I: Iterator<Item = io::Result<IndexEntry>>,
{
    let Some(deletable_max) = segments.len().checked_sub(1).filter(|n| *n > 0) else {
        return Ok(None);
    };
    let segment_of = |log_index: u64| segments.partition_point(|s| s.next_index <= log_index);
    // Segments to delete, counted from the oldest.
    let mut n = 0;
    if let Some(bytes_max) = policy.retention_bytes {
        let mut kept: u64 = segments.iter().map(|s| s.bytes).sum();
        while n < deletable_max && kept > bytes_max {
            kept -= segments[n].bytes;
            n += 1;
        }
    }
    if let Some(ms) = policy.retention_ms {
        let cutoff = now_ms.saturating_sub(ms);
        let mut by_time = deletable_max;
        for e in batches() {
            let e = e?;
            if e.max_timestamp_ms.is_none_or(|ts| ts >= cutoff) {
                by_time = by_time.min(segment_of(e.log_index));
                break;
            }
        }
        n = n.max(by_time);
    }
    if n == 0 {
        return Ok(None);
    }
    let boundary = segments[n].first_index;
    for e in batches() {
        let e = e?;
        if e.log_index >= boundary {
            return Ok(Some(e.base_offset));
        }
    }
    Ok(Some(high_watermark))
}

/// The time that time-based retention reads.
pub enum RetentionClock {
    /// The cluster's: this node's [`SteadyClock`], set back to the clock of the cluster's
    /// majority when that is earlier
    /// ([`eddy_raft::liveness::Liveness::cluster_clock_offset`]), and none while this
    /// node has readings from fewer than a majority of the members (then nothing is purged by
    /// time). The steady clock protects against a clock that jumps while the node runs; the
    /// cluster's against one that was already wrong when it started (simulator seed 485: a
    /// process restarted while its clock was ten hours ahead, led a partition and purged it).
    Cluster { steady: Arc<SteadyClock>, liveness: Arc<eddy_raft::liveness::Liveness> },
    /// One clock as it reads: the wall clock (the planted bug `retention-trusts-wall-clock`) or
    /// this node's steady clock alone (`retention-ignores-peers`).
    #[cfg(feature = "planted-bugs")]
    Wall(Arc<dyn Clock>),
}

impl RetentionClock {
    /// Milliseconds since the Unix epoch, or `None` if the cluster's time is not known here.
    /// `members` are the cluster's, from this node's metadata view.
    pub fn now_ms(&self, members: &std::collections::BTreeSet<eddy_raft::types::NodeId>) -> Option<i64> {
        match self {
            RetentionClock::Cluster { steady, liveness } => {
                let offset = liveness.cluster_clock_offset(members)?;
                Some(steady.now_ms().saturating_add(offset.min(0)))
            }
            #[cfg(feature = "planted-bugs")]
            RetentionClock::Wall(wall) => Some(wall.now_ms()),
        }
    }
}

/// Runs retention for one partition replica until `cancel` fires or the group stops.
pub struct RetentionTask {
    pub handle: PartitionHandle,
    pub clock: Arc<RetentionClock>,
    pub interval: Duration,
    /// The segment size when the topic sets no `segment.bytes`.
    pub segment_bytes_default: u64,
}

impl RetentionTask {
    pub async fn run(self, cancel: CancellationToken) {
        let mut config = self.handle.parts().retention.subscribe();
        loop {
            // A topic that keeps everything needs no timer: the task sleeps until the topic's
            // settings change (so an idle partition costs nothing).
            let limited = !config.borrow_and_update().policy.is_unlimited();
            tokio::select! {
                // Every arm only waits; a tick runs to completion outside the select.
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(self.interval), if limited => {}
                r = config.changed() => if r.is_err() { break },
            }
            if let Err(e) = self.tick().await {
                warn!("retention check: {e:#}");
            }
        }
    }

    async fn tick(&self) -> anyhow::Result<()> {
        let parts = self.handle.parts();
        let view = parts.meta.view();
        let Some(topic) = view.state.topics.get(&parts.topic).cloned() else {
            return Ok(());
        };
        parts.log.set_segment_bytes_max(topic.segment_bytes().unwrap_or(self.segment_bytes_default));
        let mut policy = RetentionPolicy::of(&topic);
        let mut now_ms = 0;
        if policy.retention_ms.is_some() {
            let members = view.state.nodes.keys().copied().collect();
            match self.clock.now_ms(&members) {
                Some(now) => now_ms = now,
                None => {
                    debug!("no clock readings from a majority of the cluster: nothing purged by time");
                    policy.retention_ms = None;
                }
            }
        }
        drop(view);
        if !policy.is_unlimited() && self.handle.status().is_leader {
            let p = *parts.progress.borrow();
            let segments = parts.log.segments();
            let index = parts.index.as_ref();
            let decided = new_log_start(
                &segments,
                || IndexScan::new(index, p.log_start_offset, p.next_offset),
                p.next_offset,
                now_ms,
                policy,
            )?;
            if let Some(offset) = decided.filter(|o| *o > p.log_start_offset) {
                let start = self.handle.advance_log_start(offset, ADVANCE_TIMEOUT).await?;
                info!(log_start_offset = start, "retention advanced the log start");
            }
        }
        self.purge().await
    }

    /// Purges this replica's Raft log up to the state machine's purge point, building a
    /// snapshot that covers it first.
    async fn purge(&self) -> anyhow::Result<()> {
        let parts = self.handle.parts();
        let Some(upto) = parts.progress.borrow().purge_index else {
            return Ok(());
        };
        let raft = &parts.raft;
        let m = raft.metrics().borrow_watched().clone();
        if m.purged.as_ref().is_some_and(|p| p.index >= upto) {
            return Ok(());
        }
        if m.snapshot.as_ref().is_none_or(|s| s.index < upto) {
            raft.trigger().snapshot().await?;
            raft.wait(Some(SNAPSHOT_TIMEOUT))
                .metrics(
                    |m| m.snapshot.as_ref().is_some_and(|s| s.index >= upto),
                    "a snapshot covering the purge point",
                )
                .await?;
        }
        debug!(upto, "purging the log");
        raft.trigger().purge_log(upto).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first_index: u64, next_index: u64, bytes: u64) -> SegmentInfo {
        SegmentInfo { first_index, next_index, bytes }
    }

    fn batch(base_offset: u64, log_index: u64, ts: Option<i64>) -> IndexEntry {
        IndexEntry { base_offset, log_index, count: 10, max_timestamp_ms: ts, skip: 0 }
    }

    /// Four segments of 100 bytes: log entries 1-3, 4-6, 7-9, 10-12 (active). Each entry but 4
    /// and 8 (not data) holds a batch of ten records.
    fn check(policy: RetentionPolicy, timestamps: [Option<i64>; 10], now_ms: i64, expect: Option<u64>) {
        let segments = [seg(1, 4, 100), seg(4, 7, 100), seg(7, 10, 100), seg(10, 13, 100)];
        let log_indexes = [1, 2, 3, 5, 6, 7, 9, 10, 11, 12];
        let batches: Vec<IndexEntry> = log_indexes
            .iter()
            .zip(timestamps)
            .enumerate()
            .map(|(i, (li, ts))| batch(10 * i as u64, *li, ts))
            .collect();
        let got = new_log_start(&segments, || batches.iter().copied().map(Ok), 100, now_ms, policy)
            .expect("no I/O error");
        assert_eq!(got, expect, "{policy:?} {timestamps:?} now {now_ms}");
    }

    #[allow(non_snake_case)]
    fn MS(ms: i64) -> RetentionPolicy {
        RetentionPolicy { retention_ms: Some(ms), retention_bytes: None }
    }

    #[allow(non_snake_case)]
    fn BYTES(bytes: u64) -> RetentionPolicy {
        RetentionPolicy { retention_ms: None, retention_bytes: Some(bytes) }
    }

    #[test]
    fn by_time_whole_segments_oldest_first() {
        let ts = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map(Some);
        // Nothing old enough.
        check(MS(100), ts, 100, None);
        // Batches with timestamps below 3 are old, but segment 1 also holds 3: it stays.
        check(MS(97), ts, 100, None);
        // Segment 1 (timestamps 1-3) goes; the log starts at segment 2's first batch.
        check(MS(96), ts, 100, Some(30));
        check(MS(94), ts, 100, Some(50));
        // Everything is old, but the active segment is always kept.
        check(MS(1), ts, 100, Some(70));
        // A young batch in an old segment keeps it and every later segment.
        let mixed =
            [Some(1), Some(99), Some(1), Some(1), Some(1), Some(1), Some(1), Some(1), Some(1), Some(1)];
        check(MS(50), mixed, 100, None);
        // A batch of unknown time keeps its segment.
        let unknown = [Some(1), Some(1), Some(1), None, Some(1), Some(1), Some(1), Some(1), Some(1), Some(1)];
        check(MS(50), unknown, 100, Some(30));
    }

    #[test]
    fn by_size_keeps_the_newest_segments_within_the_bound() {
        let ts = [Some(0); 10];
        check(BYTES(400), ts, 0, None);
        check(BYTES(399), ts, 0, Some(30));
        check(BYTES(200), ts, 0, Some(50));
        check(BYTES(150), ts, 0, Some(70));
        // The active segment stays even when it alone exceeds the bound.
        check(BYTES(1), ts, 0, Some(70));
        // Time and size: whichever deletes more.
        let both = RetentionPolicy { retention_ms: Some(96), retention_bytes: Some(200) };
        check(both, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map(Some), 100, Some(50));
    }

    #[test]
    fn a_single_segment_or_none_is_kept() {
        let batches = [batch(0, 1, Some(0))];
        let got = new_log_start(&[seg(1, 2, 10)], || batches.iter().copied().map(Ok), 10, 1000, MS(1));
        assert_eq!(got.ok(), Some(None));
        let got = new_log_start(&[], || batches.iter().copied().map(Ok), 10, 1000, MS(1));
        assert_eq!(got.ok(), Some(None));
    }

    #[test]
    fn deleted_segments_without_kept_batches_start_the_log_at_the_high_watermark() {
        // Segment 2 holds no batch: after deleting segment 1, the log starts at the watermark.
        let segments = [seg(1, 3, 100), seg(3, 5, 100)];
        let batches = [batch(0, 1, Some(0)), batch(10, 2, Some(0))];
        let got = new_log_start(&segments, || batches.iter().copied().map(Ok), 20, 1000, MS(1));
        assert_eq!(got.ok(), Some(Some(20)));
    }
}
