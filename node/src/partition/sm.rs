//! A partition group's state machine: applies produce batches (assigning offsets, deduplicating
//! idempotent retries) and retention's log start advances, persists the partition state and
//! offset index in the state store with the last applied log id, and publishes the new high
//! watermark.
//!
//! The state goes to the store through a [`BufferedTree`]: applies write to memory (readers see
//! it at once), and the tree below gets it all in one batch every [`PERSIST_INTERVAL`] or
//! `PENDING_MAX` writes (in a task of its own, so applying does not wait for it), before a
//! snapshot, and with any batch that deletes. The store then holds a prefix of the applied log
//! (as before: a batch is durable only after a flush anyway), and a restarted replica applies
//! the log after the stored last applied id again once its leader tells it what is committed.
//! Persisting per apply cost two `sled` log-buffer writes per Raft entry on every replica, about
//! a third of the nodes' CPU at one event in flight; persisting inline once a second stalled
//! every replica's apply (the ack p99.9 at 2,000 events/s went from 5 to 15 ms).
//!
//! A snapshot holds the partition's scalar state and producer table, never records: a replica
//! that installs one has no records before the snapshot's high watermark, so its log starts
//! there.

use std::io;
use std::sync::Arc;

use eddy_raft::C;
use eddy_raft::GroupId;
use eddy_raft::LogId;
use eddy_raft::Reply;
use eddy_raft::Snapshot;
use eddy_raft::SnapshotData;
use eddy_raft::SnapshotMeta;
use eddy_raft::StoredMembership;
use eddy_raft::kv::BufferedTree;
use eddy_raft::kv::KvBatch;
use eddy_raft::kv::KvTree;
use eddy_raft::kv::StateStore;
use futures::Stream;
use futures::StreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use super::command::CommandHeader;
use super::command::PartitionCommand;
use super::command::PartitionReply;
use super::producers::PRODUCERS_MAX;
use super::producers::ProducerEntry;
use super::producers::ProducerTable;
use super::state::IndexScan;
use super::state::MEMBERSHIP_KEY;
use super::state::META_KEY;
use super::state::PartitionMeta;
use super::state::PartitionState;
use super::state::offset_key;
use super::state::producer_key;
use super::state::producer_key_range;
use super::state::time_key;
use super::state::time_key_end;
use crate::sm_common;

/// Index entries deleted per batch when cleaning up below the log start.
const INDEX_DELETE_CHUNK: usize = 4096;

/// How long the stored state may lag the applied state.
pub const PERSIST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Buffered writes that trigger a persist before the interval is up.
///
/// Small on purpose: with persists of about a thousand keys (half a second at 2,000 events/s)
/// the tail grew by milliseconds (measured, not traced: presumably `sled` taking the batch
/// holds up the replica's reads through it), and at 2,000 events/s the consumer's end-to-end
/// p99 was 7-8.5 ms against 3.4-3.5 ms with 64
/// (ack p99 4.1-4.9 against 3.3-3.5 ms), at the same throughput and CPU per event at 256 in
/// flight (115-118k events/s both; three local nodes, 2026-12-04, `bench latency` and
/// `bench produce`). A persist starts only when the last one is done, so under load they run
/// back to back and take whatever has gathered.
const PENDING_MAX: usize = 64;

/// What readers need to know about the applied state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The high watermark: records below it are committed and readable.
    pub next_offset: u64,
    pub log_start_offset: u64,
    pub last_applied: Option<LogId>,
    /// Log entries up to this index may be purged (retention).
    pub purge_index: Option<u64>,
}

/// A partition snapshot's format (it crosses the network: a rolling upgrade's older nodes
/// install the newer ones' snapshots, so a new version is written only once no node runs a
/// build that reads only the older one).
const PARTITION_SNAPSHOT: sm_common::Format = sm_common::Format { tag: b"EDQ", newest: 0 };

#[derive(Serialize, Deserialize)]
struct PartitionSnapshot {
    meta: PartitionMeta,
    producers: Vec<(u64, ProducerEntry)>,
}

pub struct PartitionStateMachine {
    state: PartitionState,
    tree: Arc<BufferedTree>,
    store: Arc<dyn StateStore>,
    progress: watch::Sender<Progress>,
    persisted_at: tokio::time::Instant,
    /// The persist started in the background, if it may still run.
    persisting: Option<tokio::task::JoinHandle<()>>,
    /// The group's log: an entry is applied only once it is on this replica's disk.
    log: Option<eddy_raft::log::LogReader>,
}

/// The state-store tree of a partition group.
pub fn tree_name(group: GroupId) -> String {
    format!("g{group}")
}

impl PartitionStateMachine {
    pub fn open(
        store: Arc<dyn StateStore>,
        group: GroupId,
    ) -> io::Result<(Self, watch::Receiver<Progress>, Arc<BufferedTree>)> {
        // The stored state is read, and cleaned up, before the buffer exists (it holds nothing).
        let below = store.tree(&tree_name(group))?;
        let mut meta: PartitionMeta = match below.get(META_KEY)? {
            Some(b) => PartitionMeta::decode(&b)?,
            None => PartitionMeta::default(),
        };
        if let Some(b) = below.get(MEMBERSHIP_KEY)? {
            meta.membership = sm_common::decode(&b, "partition membership")?;
        }
        let (from, to) = producer_key_range();
        let mut producers = Vec::new();
        for (k, v) in below.scan(&from, &to, PRODUCERS_MAX + 1)? {
            let id = u64::from_be_bytes(k[1..].try_into().map_err(io::Error::other)?);
            producers.push((id, sm_common::decode::<ProducerEntry>(&v, "producer entry")?));
        }
        let state = PartitionState { meta, producers: ProducerTable::from_entries(producers) };
        delete_below_log_start(below.as_ref(), &state.meta)?;
        let tree = Arc::new(BufferedTree::new(below));
        let (progress, rx) = watch::channel(progress_of(&state.meta));
        let sm = Self {
            state,
            tree: tree.clone(),
            store,
            progress,
            persisted_at: tokio::time::Instant::now(),
            persisting: None,
            log: None,
        };
        Ok((sm, rx, tree))
    }

    /// Applies an entry only once `log` holds it on disk (see `LogReader::wait_durable`), so
    /// the stored state is never ahead of the log.
    pub fn with_log(mut self, log: eddy_raft::log::LogReader) -> Self {
        self.log = Some(log);
        self
    }
}

/// Removes offset- and time-index entries below the log start (left behind by a crash while a
/// snapshot was installed).
fn delete_below_log_start(tree: &dyn KvTree, m: &PartitionMeta) -> io::Result<()> {
    loop {
        let mut batch = KvBatch::default();
        for e in IndexScan::new(tree, 0, m.log_start_offset).take(INDEX_DELETE_CHUNK) {
            batch.delete(offset_key(e?.base_offset));
        }
        if batch.is_empty() {
            break;
        }
        tree.apply(batch)?;
    }
    if m.max_timestamp_ms.is_none() && m.log_start_offset == m.next_offset {
        // Nothing is kept: no time-index entry may remain either.
        loop {
            let keys = tree.scan(&time_key(i64::MIN), &time_key_end(), INDEX_DELETE_CHUNK)?;
            let mut batch = KvBatch::default();
            for (k, _) in keys {
                batch.delete(k);
            }
            if batch.is_empty() {
                break;
            }
            tree.apply(batch)?;
        }
    }
    Ok(())
}

fn progress_of(m: &PartitionMeta) -> Progress {
    Progress {
        next_offset: m.next_offset,
        log_start_offset: m.log_start_offset,
        last_applied: m.last_applied,
        purge_index: m.purge_index,
    }
}

impl RaftStateMachine<C> for PartitionStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = PartitionSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.state.meta.last_applied, self.state.meta.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = KvBatch::default();
        let mut replies = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            if let Some(log) = &self.log {
                log.wait_durable(entry.log_id.index).await;
            }
            let applied_before = self.state.meta.last_applied.replace(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => PartitionReply::Done,
                EntryPayload::Normal(p) => match PartitionCommand::decode_header(&p.0) {
                    Ok(CommandHeader::Produce(mut h)) => {
                        if h.max_timestamp_ms.is_none() {
                            // An entry of the first format: the records tell.
                            h.max_timestamp_ms = PartitionCommand::decode_batch(&p.0)
                                .ok()
                                .and_then(|b| b.records.iter().map(|r| r.timestamp_ms).max());
                        }
                        self.state.apply(entry.log_id.index, h, &mut batch)
                    }
                    Ok(CommandHeader::ProduceBatches(h, subs)) => {
                        self.state.apply_batches(entry.log_id.index, h, &subs, &mut batch)
                    }
                    Ok(CommandHeader::AdvanceLogStart { offset }) => {
                        // The advance reads the offset index, so what this call applied so far
                        // goes to the tree first, with the state it describes (should it reach
                        // the store without the rest, a replay resumes after the entry before
                        // this one). Then readers learn the new log start before any index
                        // entry below it is deleted.
                        let mut before = self.state.meta.clone();
                        before.last_applied = applied_before;
                        batch.put(META_KEY, sm_common::encode(&before));
                        self.tree.apply(std::mem::take(&mut batch))?;
                        let reply = self.state.advance_log_start(
                            entry.log_id.index,
                            offset,
                            self.tree.as_ref(),
                            &mut batch,
                        )?;
                        self.progress.send_replace(progress_of(&self.state.meta));
                        reply
                    }
                    // Every replica decodes the same bytes the same way, so they agree.
                    Err(e) => PartitionReply::Invalid(e.to_string()),
                },
                EntryPayload::Membership(m) => {
                    self.state.meta.membership = StoredMembership::new(Some(entry.log_id), m);
                    batch.put(MEMBERSHIP_KEY, sm_common::encode(&self.state.meta.membership));
                    PartitionReply::Done
                }
            };
            if let Some(r) = responder {
                replies.push((r, reply));
            }
        }
        batch.put(META_KEY, sm_common::encode(&self.state.meta));
        // The index entries are written before the high watermark moves, so a reader that sees
        // the new watermark finds every record below it.
        self.tree.apply(batch)?;
        let due = self.persisted_at.elapsed() >= PERSIST_INTERVAL || self.tree.pending() >= PENDING_MAX;
        if due && self.persisting.as_ref().is_none_or(|t| t.is_finished()) {
            // The stored state only lags further if it fails (the log replays it).
            self.persisting = Some(self.tree.persist_in_background());
            self.persisted_at = tokio::time::Instant::now();
        }
        self.progress.send_replace(progress_of(&self.state.meta));
        for (r, reply) in replies {
            r.send(Reply(reply.encode()));
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let snapshot =
            PartitionSnapshot { meta: self.state.meta.clone(), producers: self.state.producer_entries() };
        PartitionSnapshotBuilder {
            snapshot: Some(snapshot),
            tree: self.tree.clone(),
            store: self.store.clone(),
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, data: SnapshotData) -> Result<(), io::Error> {
        let (_version, body) = sm_common::versioned(&data, PARTITION_SNAPSHOT, "the partition snapshot")?;
        let snap: PartitionSnapshot = sm_common::decode(body, "partition snapshot")?;
        // This replica's log restarts after the snapshot, so the records before it are gone
        // here: the log starts at the snapshot's high watermark, and the time index is empty.
        let mut m = snap.meta;
        m.last_applied = meta.last_log_id;
        m.membership = meta.last_membership.clone();
        m.log_start_offset = m.next_offset;
        m.purge_index = meta.last_log_id.map(|l| l.index);
        m.max_timestamp_ms = None;
        // The new state replaces the old in one batch; what the old state indexed is all below
        // the new log start, so it is deleted after, and a crash in between leaves only
        // unreachable entries, which `open` removes.
        let mut batch = KvBatch::default();
        let (from, to) = producer_key_range();
        for (k, _) in self.tree.scan(&from, &to, PRODUCERS_MAX + 1)? {
            batch.delete(k);
        }
        for (id, e) in &snap.producers {
            batch.put(producer_key(*id), sm_common::encode(e));
        }
        batch.put(META_KEY, sm_common::encode(&m));
        batch.put(MEMBERSHIP_KEY, sm_common::encode(&m.membership));
        sm_common::put_snapshot(&mut batch, meta, &data);
        self.tree.apply(batch)?;
        self.state = PartitionState { meta: m, producers: ProducerTable::from_entries(snap.producers) };
        self.progress.send_replace(progress_of(&self.state.meta));
        delete_below_log_start(self.tree.as_ref(), &self.state.meta)?;
        self.tree.persist()?;
        self.store.flush().await?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        sm_common::load_snapshot(self.tree.as_ref())
    }
}

/// Builds a snapshot of the partition's state (not its records) as of its creation.
pub struct PartitionSnapshotBuilder {
    snapshot: Option<PartitionSnapshot>,
    tree: Arc<BufferedTree>,
    store: Arc<dyn StateStore>,
}

impl RaftSnapshotBuilder<C> for PartitionSnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let snap = self.snapshot.take().ok_or_else(|| io::Error::other("snapshot builder used twice"))?;
        let data = sm_common::encode(&snap);
        let meta = SnapshotMeta {
            last_log_id: snap.meta.last_applied,
            last_membership: snap.meta.membership.clone(),
        };
        let mut batch = KvBatch::default();
        sm_common::put_snapshot(&mut batch, &meta, &data);
        // With everything applied so far: the log before the snapshot may be purged once it
        // exists, so the stored state must not be older than the snapshot.
        self.tree.apply(batch)?;
        self.tree.persist()?;
        self.store.flush().await?;
        Ok(Snapshot { meta, snapshot: data })
    }
}
