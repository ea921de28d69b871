//! A partition's replicated state and the deterministic rules that change it: offset
//! assignment and idempotent-producer deduplication.
//!
//! Offsets are assigned when an entry is applied: a batch of `n` records accepted at next offset
//! `o` occupies `[o, o + n)`. The state store maps each accepted batch's base offset to the log
//! index of its entry (the *offset index*), which is how a fetch finds records in the Raft log.
//! A duplicate or refused batch stays in the log but gets no offsets and no index entry.
//!
//! Each index entry also holds its batch's greatest record timestamp, and a *time index* maps
//! every new running maximum of those timestamps to the batch that set it. Timestamps need not
//! grow with offsets, but the running maximum does, so the first offset whose timestamp is at or
//! after `T` is in the batch of the first time-index entry at or above `T` (see
//! [`first_batch_at_or_after`]).
//!
//! Retention advances the *log start offset*: index entries below it are deleted, and the time
//! index is rebuilt over the records that remain (see [`PartitionState::advance_log_start`]).

use std::io;

use eddy_raft::LogId;
use eddy_raft::StoredMembership;
use eddy_raft::kv::KvBatch;
use eddy_raft::kv::KvTree;
use serde::Deserialize;
use serde::Serialize;

use super::command::PartitionReply;
use super::command::ProduceHeader;
use super::command::SubBatch;
use super::producers::BatchRecord;
use super::producers::ProducerChange;
use super::producers::ProducerEntry;
use super::producers::ProducerTable;
use super::producers::SequenceCheck;
use crate::sm_common;

pub const META_KEY: &[u8] = b"m";
pub const MEMBERSHIP_KEY: &[u8] = b"mb";
const PRODUCER_PREFIX: u8 = b'p';
const OFFSET_PREFIX: u8 = b'o';
const TIME_PREFIX: u8 = b't';
/// Index entries read per scan while advancing the log start.
const SCAN_CHUNK: usize = 4096;

/// Key of the offset-index entry for the batch starting at `offset`.
pub fn offset_key(offset: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = OFFSET_PREFIX;
    k[1..].copy_from_slice(&offset.to_be_bytes());
    k
}

/// Key of the time-index entry for running maximum `ts`: ordered like the timestamps.
pub fn time_key(ts: i64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = TIME_PREFIX;
    k[1..].copy_from_slice(&((ts as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// The end (exclusive) of the time index's keys.
pub fn time_key_end() -> [u8; 1] {
    [TIME_PREFIX + 1]
}

fn decode_time(key: &[u8], value: &[u8]) -> Option<(i64, u64)> {
    if key.len() != 9 || key[0] != TIME_PREFIX || value.len() != 8 {
        return None;
    }
    let ts = (u64::from_be_bytes(key[1..].try_into().ok()?) ^ (1 << 63)) as i64;
    Some((ts, u64::from_be_bytes(value.try_into().ok()?)))
}

pub fn producer_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = PRODUCER_PREFIX;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn producer_key_range() -> ([u8; 9], [u8; 9]) {
    (producer_key(0), [PRODUCER_PREFIX + 1, 0, 0, 0, 0, 0, 0, 0, 0])
}

/// An offset-index entry: where a batch's records are in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub base_offset: u64,
    pub log_index: u64,
    pub count: u32,
    /// The batch's greatest record timestamp; `None` for entries written before it was kept.
    pub max_timestamp_ms: Option<i64>,
    /// Records of the log entry before this batch's: non-zero for the later batches of an
    /// entry holding several.
    pub skip: u32,
}

impl IndexEntry {
    /// log index (8), count (4), the greatest timestamp (8) when known, and the records to skip
    /// (4) when there are any (so entries of one batch keep the earlier formats).
    pub fn value(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.log_index.to_be_bytes());
        v.extend_from_slice(&self.count.to_be_bytes());
        if self.max_timestamp_ms.is_some() || self.skip > 0 {
            v.extend_from_slice(&self.max_timestamp_ms.unwrap_or(i64::MIN).to_be_bytes());
        }
        if self.skip > 0 {
            v.extend_from_slice(&self.skip.to_be_bytes());
        }
        v
    }

    pub fn decode(key: &[u8], value: &[u8]) -> Option<Self> {
        if key.len() != 9 || key[0] != OFFSET_PREFIX || ![12, 20, 24].contains(&value.len()) {
            return None;
        }
        Some(Self {
            base_offset: u64::from_be_bytes(key[1..].try_into().ok()?),
            log_index: u64::from_be_bytes(value[..8].try_into().ok()?),
            count: u32::from_be_bytes(value[8..12].try_into().ok()?),
            max_timestamp_ms: match value.get(12..20) {
                Some(ts) => Some(i64::from_be_bytes(ts.try_into().ok()?)),
                None => None,
            },
            skip: match value.get(20..24) {
                Some(s) => u32::from_be_bytes(s.try_into().ok()?),
                None => 0,
            },
        })
    }

    /// [`Self::decode`] for an entry read from the store: one that does not decode is an error
    /// naming it, never skipped (a reader that stepped over an entry would serve a gap).
    pub fn decode_stored(key: &[u8], value: &[u8]) -> io::Result<Self> {
        Self::decode(key, value).ok_or_else(|| {
            corrupt(&format!(
                "offset index entry {key:02x?} has a value of {} bytes (12, 20 or 24 expected)",
                value.len()
            ))
        })
    }

    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }
}

/// The offset-index entries with base offsets in `[from, to)`, in order, read in chunks.
pub struct IndexScan<'a> {
    tree: &'a dyn KvTree,
    next: u64,
    to: u64,
    buf: std::collections::VecDeque<IndexEntry>,
    done: bool,
    /// An entry that did not decode: returned once the entries before it are.
    error: Option<io::Error>,
}

impl<'a> IndexScan<'a> {
    pub fn new(tree: &'a dyn KvTree, from: u64, to: u64) -> Self {
        Self { tree, next: from, to, buf: Default::default(), done: false, error: None }
    }
}

impl Iterator for IndexScan<'_> {
    type Item = io::Result<IndexEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() && !self.done {
            if self.next >= self.to {
                self.done = true;
                return None;
            }
            let chunk = match self.tree.scan(&offset_key(self.next), &offset_key(self.to), SCAN_CHUNK) {
                Ok(c) => c,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            self.done = chunk.len() < SCAN_CHUNK;
            for (k, v) in &chunk {
                match IndexEntry::decode_stored(k, v) {
                    Ok(e) => self.buf.push_back(e),
                    Err(e) => {
                        self.done = true;
                        self.error = Some(e);
                        break;
                    }
                }
            }
            match self.buf.back() {
                Some(last) => self.next = last.base_offset + 1,
                None => self.done = true,
            }
        }
        self.buf.pop_front().map(Ok).or_else(|| self.error.take().map(Err))
    }
}

/// The first accepted batch in `[log_start, high_watermark)` holding a record with a timestamp
/// at or after `ts`, from the time index (one seek, no scan).
pub fn first_batch_at_or_after(
    tree: &dyn KvTree,
    ts: i64,
    log_start: u64,
    high_watermark: u64,
) -> io::Result<Option<IndexEntry>> {
    let Some((k, v)) = tree.scan(&time_key(ts), &time_key_end(), 1)?.into_iter().next() else {
        return Ok(None);
    };
    let (_, base) = decode_time(&k, &v).ok_or_else(|| corrupt("time index entry"))?;
    if base >= high_watermark {
        return Ok(None);
    }
    if base < log_start {
        return Err(io::Error::new(io::ErrorKind::NotFound, "the time index is behind the log start"));
    }
    let e = tree.get(&offset_key(base))?.ok_or_else(|| corrupt("time index names a missing batch"))?;
    IndexEntry::decode_stored(&offset_key(base), &e).map(Some)
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The partition's scalar state, stored under [`META_KEY`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    pub last_applied: Option<LogId>,
    /// Stored under its own key ([`MEMBERSHIP_KEY`]): it changes rarely, and the rest of this
    /// struct is rewritten on every apply.
    #[serde(skip)]
    pub membership: StoredMembership,
    /// The offset the next accepted record gets; also the high watermark, since only committed
    /// entries are applied.
    pub next_offset: u64,
    /// The first offset this replica can serve.
    pub log_start_offset: u64,
    /// Log entries up to this index hold no record at or above the log start: retention lets
    /// the replica purge them (once a snapshot covers them).
    pub purge_index: Option<u64>,
    /// The greatest record timestamp of the records kept (the time index's last key).
    pub max_timestamp_ms: Option<i64>,
}

/// [`PartitionMeta`] as versions before retention stored it.
#[derive(Deserialize)]
struct PartitionMetaV1 {
    last_applied: Option<LogId>,
    next_offset: u64,
    log_start_offset: u64,
}

/// The partition state tree's format: its version is that of the [`META_KEY`] record, and it
/// covers every record in the tree (membership, producers, the offset and time indexes), which
/// are read only after it. Version 0 evolved compatibly so far: [`PartitionMetaV1`], and index
/// values of 12, 20 or 24 bytes.
pub const PARTITION_STATE: sm_common::Format = sm_common::Format { tag: b"EDP", newest: 0 };

impl PartitionMeta {
    /// Decodes the stored state, in the current or the first format.
    pub fn decode(b: &[u8]) -> io::Result<Self> {
        let (_version, b) = sm_common::versioned(b, PARTITION_STATE, "the partition state")?;
        match sm_common::decode::<Self>(b, "partition state") {
            Ok(m) => Ok(m),
            Err(e) => match postcard::from_bytes::<PartitionMetaV1>(b) {
                Ok(v1) => Ok(Self {
                    last_applied: v1.last_applied,
                    next_offset: v1.next_offset,
                    log_start_offset: v1.log_start_offset,
                    ..Self::default()
                }),
                Err(_) => Err(e),
            },
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionState {
    pub meta: PartitionMeta,
    pub producers: ProducerTable,
}

impl PartitionState {
    /// Applies the produce entry at `log_index` (described by its header), adding what must be
    /// persisted to `batch`.
    pub fn apply(&mut self, log_index: u64, b: ProduceHeader, batch: &mut KvBatch) -> PartitionReply {
        self.apply_produce(log_index, b, 0, batch)
    }

    /// Applies an entry of several batches: each is checked, numbered and indexed as if it were
    /// an entry of its own (a refused one gets no offsets, and the batches after it still go
    /// through their own checks), so a producer that retries one of them alone is answered as
    /// if it had been written alone.
    pub fn apply_batches(
        &mut self,
        log_index: u64,
        h: ProduceHeader,
        subs: &[SubBatch],
        batch: &mut KvBatch,
    ) -> PartitionReply {
        let mut sequence = h.base_sequence;
        let mut skip = 0u32;
        let mut replies = Vec::with_capacity(subs.len());
        for sub in subs {
            let b = ProduceHeader {
                base_sequence: sequence,
                count: sub.count,
                max_timestamp_ms: Some(sub.max_timestamp_ms),
                ..h
            };
            replies.push(self.apply_produce(log_index, b, skip, batch));
            if h.producer_id != 0 {
                sequence = sequence.saturating_add(u64::from(sub.count));
            }
            skip = skip.saturating_add(sub.count);
        }
        PartitionReply::Batches(replies)
    }

    fn apply_produce(
        &mut self,
        log_index: u64,
        b: ProduceHeader,
        skip: u32,
        batch: &mut KvBatch,
    ) -> PartitionReply {
        let count = b.count;
        if count == 0 {
            return PartitionReply::Invalid("records: a batch needs at least one record".into());
        }
        if b.producer_id != 0 {
            match self.producers.check(b.producer_id, b.base_sequence, count, b.strict_sequence) {
                SequenceCheck::Accept => {}
                SequenceCheck::Duplicate { base_offset, count } => {
                    return PartitionReply::Produced { base_offset, count, duplicate: true };
                }
                SequenceCheck::OutOfOrder { expected } => {
                    return PartitionReply::OutOfOrderSequence { expected, got: b.base_sequence };
                }
                SequenceCheck::UnknownProducer => {
                    return PartitionReply::UnknownProducer { got: b.base_sequence };
                }
            }
        }
        let base_offset = self.meta.next_offset;
        self.meta.next_offset += u64::from(count);
        let max_timestamp_ms = b.max_timestamp_ms;
        batch.put(
            offset_key(base_offset),
            IndexEntry { base_offset, log_index, count, max_timestamp_ms, skip }.value(),
        );
        if let Some(ts) = max_timestamp_ms
            && self.meta.max_timestamp_ms.is_none_or(|m| ts > m)
        {
            batch.put(time_key(ts), base_offset.to_be_bytes());
            self.meta.max_timestamp_ms = Some(ts);
        }
        if b.producer_id != 0 {
            let mut changes = Vec::new();
            let rec = BatchRecord { base_sequence: b.base_sequence, count, base_offset };
            self.producers.record(b.producer_id, rec, log_index, &mut changes);
            for c in changes {
                match c {
                    ProducerChange::Put(id, e) => batch.put(producer_key(id), sm_common::encode(&e)),
                    ProducerChange::Evict(id) => batch.delete(producer_key(id)),
                }
            }
        }
        PartitionReply::Produced { base_offset, count, duplicate: false }
    }

    /// Applies `AdvanceLogStart { offset }` at `log_index`: records below `offset` (rounded down
    /// to the start of its batch, and never past the high watermark) are forgotten. `tree` must
    /// hold every entry applied before this one; the changes go into `batch`.
    pub fn advance_log_start(
        &mut self,
        log_index: u64,
        offset: u64,
        tree: &dyn KvTree,
        batch: &mut KvBatch,
    ) -> io::Result<PartitionReply> {
        let old = self.meta.log_start_offset;
        let hw = self.meta.next_offset;
        let mut new = offset.min(hw);
        let mut first_kept = None;
        if new <= old {
            return Ok(PartitionReply::LogStart { log_start_offset: old });
        }
        // The index holds the batch at `old` (below the watermark), so the floor is at or above it.
        if new < hw {
            let (k, v) = tree
                .floor(&offset_key(new))?
                .ok_or_else(|| corrupt("no index entry below the high watermark"))?;
            let e = IndexEntry::decode_stored(&k, &v)?;
            new = e.base_offset;
            first_kept = Some(e);
        }
        if new <= old {
            return Ok(PartitionReply::LogStart { log_start_offset: old });
        }
        // Everything before the first kept batch's entry (or before this entry, when nothing is
        // kept) holds only forgotten records or no records at all.
        let purge = first_kept.map_or(log_index, |e| e.log_index).checked_sub(1);
        self.meta.purge_index = self.meta.purge_index.max(purge);
        self.meta.log_start_offset = new;

        for e in IndexScan::new(tree, old, new) {
            batch.delete(offset_key(e?.base_offset));
        }
        // Time-index entries of forgotten batches form a prefix of the time index.
        let mut first_remaining = None;
        let mut from = time_key(i64::MIN).to_vec();
        'time: loop {
            let chunk = tree.scan(&from, &time_key_end(), SCAN_CHUNK)?;
            for (k, v) in &chunk {
                let (ts, base) = decode_time(k, v).ok_or_else(|| corrupt("time index entry"))?;
                if base >= new {
                    first_remaining = Some((ts, base));
                    break 'time;
                }
                batch.delete(k.clone());
            }
            match chunk.last() {
                Some((k, _)) if chunk.len() == SCAN_CHUNK => from = [k.as_slice(), &[0]].concat(),
                _ => break,
            }
        }
        // The batches before the first remaining entry never raised the running maximum (older
        // records had higher timestamps); index their own running maximum now, so the time
        // index again describes exactly the records kept.
        let until = first_remaining.map_or(hw, |(_, base)| base);
        let mut max = None;
        for e in IndexScan::new(tree, new, until) {
            let e = e?;
            if let Some(ts) = e.max_timestamp_ms.filter(|ts| max.is_none_or(|m| *ts > m)) {
                batch.put(time_key(ts), e.base_offset.to_be_bytes());
                max = Some(ts);
            }
        }
        if first_remaining.is_none() {
            self.meta.max_timestamp_ms = max;
        }
        Ok(PartitionReply::LogStart { log_start_offset: new })
    }

    /// The scalar state and producer table, as a snapshot holds them.
    pub fn producer_entries(&self) -> Vec<(u64, ProducerEntry)> {
        self.producers.entries().map(|(k, v)| (*k, v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use eddy_raft::kv::StateStore;
    use proptest::prelude::*;

    use super::*;

    fn batch(pid: u64, seq: u64, n: usize) -> ProduceHeader {
        ProduceHeader {
            producer_id: pid,
            base_sequence: seq,
            count: n as u32,
            max_timestamp_ms: Some(seq as i64),
            strict_sequence: true,
        }
    }

    /// `ProduceBatch::coalescible`, for headers.
    fn coalescible(a: &ProduceHeader, b: &ProduceHeader) -> bool {
        a.producer_id == b.producer_id
            && (a.producer_id == 0 || a.base_sequence + u64::from(a.count) == b.base_sequence)
    }

    fn tree() -> Arc<dyn KvTree> {
        eddy_raft::mem::MemStateStore::default().tree("g1").expect("in-memory tree")
    }

    /// A partition whose batches hold records stamped `timestamps[i]`, one batch per entry of
    /// `batches` (its record count), applied at log indexes 1, 3, 5, … (as if every other entry
    /// were not data). Returns the state, its tree and every record's timestamp by offset.
    fn applied(batches: &[Vec<i64>]) -> (PartitionState, Arc<dyn KvTree>) {
        let t = tree();
        let mut st = PartitionState::default();
        for (i, ts) in batches.iter().enumerate() {
            let mut kv = KvBatch::default();
            let h = ProduceHeader {
                producer_id: 0,
                base_sequence: 0,
                count: ts.len() as u32,
                max_timestamp_ms: ts.iter().copied().max(),
                strict_sequence: true,
            };
            st.apply(2 * i as u64 + 1, h, &mut kv);
            t.apply(kv).expect("apply");
        }
        (st, t)
    }

    /// The first offset at or above the log start whose timestamp is at or after `ts`, as the
    /// time index finds it: the batch, then the record within it.
    fn lookup(st: &PartitionState, t: &dyn KvTree, records: &[i64], ts: i64) -> Option<u64> {
        let e =
            first_batch_at_or_after(t, ts, st.meta.log_start_offset, st.meta.next_offset).expect("lookup")?;
        (e.base_offset..e.end_offset()).find(|o| records[*o as usize] >= ts)
    }

    fn index_offsets(t: &dyn KvTree) -> Vec<u64> {
        IndexScan::new(t, 0, u64::MAX).map(|e| e.expect("scan").base_offset).collect()
    }

    proptest! {
        /// An entry of several batches is applied exactly as those batches would be, each in an
        /// entry of its own: same replies (offsets, duplicates, refusals), same producer table,
        /// same high watermark; and each accepted batch is indexed at its place in the entry.
        #[test]
        fn batches_in_one_entry_apply_like_separate_entries(
            requests in proptest::collection::vec((0u64..3, 1u32..4, 0u8..4, 1usize..4), 1..60)
        ) {
            // Each request: producer, record count, what its sequence is (0: the next, 1: a
            // retry of the producer's last request, 2: a gap, 3: zero), and how many following
            // requests it may be coalesced with.
            let mut next = [0u64; 3];
            let mut last = [(0u64, 1u32); 3];
            let mut reqs = Vec::new();
            for (pid, count, kind, _) in &requests {
                let p = *pid as usize;
                let seq = match kind {
                    0 => next[p],
                    1 => last[p].0,
                    2 => next[p] + 7,
                    _ => 0,
                };
                let count = if *kind == 1 { last[p].1 } else { *count };
                if *kind == 0 {
                    last[p] = (seq, count);
                    next[p] = seq + u64::from(count);
                }
                reqs.push(batch(*pid, seq, count as usize));
            }
            // Alone: one entry each.
            let mut alone = PartitionState::default();
            let replies_alone: Vec<PartitionReply> = reqs
                .iter()
                .enumerate()
                .map(|(i, h)| alone.apply(i as u64 + 1, *h, &mut KvBatch::default()))
                .collect();
            // Coalesced: runs that `ProduceBatch::coalescible` allows, as long as each asks.
            let mut together = PartitionState::default();
            let mut replies_together = Vec::new();
            let mut i = 0;
            let mut log_index = 0;
            while i < reqs.len() {
                let mut j = i + 1;
                while j < reqs.len() && j - i < requests[i].3 && coalescible(&reqs[j - 1], &reqs[j]) {
                    j += 1;
                }
                log_index += 1;
                let mut kv = KvBatch::default();
                if j == i + 1 {
                    replies_together.push(together.apply(log_index, reqs[i], &mut kv));
                } else {
                    let subs: Vec<SubBatch> = reqs[i..j]
                        .iter()
                        .map(|h| SubBatch { count: h.count, max_timestamp_ms: h.max_timestamp_ms.unwrap() })
                        .collect();
                    let total = subs.iter().map(|s| s.count).sum();
                    let h = ProduceHeader { count: total, ..reqs[i] };
                    let PartitionReply::Batches(each) = together.apply_batches(log_index, h, &subs, &mut kv) else {
                        panic!("an entry of several batches has one reply per batch");
                    };
                    prop_assert_eq!(each.len(), j - i);
                    // Every accepted batch's index entry names its records in the entry.
                    let mut skip = 0;
                    for (h, r) in reqs[i..j].iter().zip(&each) {
                        if let PartitionReply::Produced { base_offset, count, duplicate: false } = r {
                            let e = kv.ops.iter().find_map(|(k, v)| {
                                v.as_ref().and_then(|v| IndexEntry::decode(k, v)).filter(|e| e.base_offset == *base_offset)
                            });
                            prop_assert_eq!(e.map(|e| (e.log_index, e.skip, e.count)), Some((log_index, skip, *count)));
                        }
                        skip += h.count;
                    }
                    replies_together.extend(each);
                }
                i = j;
            }
            prop_assert_eq!(replies_together, replies_alone);
            prop_assert_eq!(together.meta.next_offset, alone.meta.next_offset);
            let batches = |st: &PartitionState| -> Vec<(u64, Vec<BatchRecord>)> {
                st.producer_entries().into_iter().map(|(id, e)| (id, e.batches.into())).collect()
            };
            prop_assert_eq!(batches(&together), batches(&alone));
        }

        /// Offsets are dense and assigned in log order; the offset index has one entry per
        /// accepted batch, pointing at its log entry; duplicates get their original offsets.
        #[test]
        fn offsets_are_dense_monotonic_and_indexed(
            ops in proptest::collection::vec((0u64..3, 1usize..5, any::<bool>()), 1..100)
        ) {
            let mut st = PartitionState::default();
            let mut index: Vec<IndexEntry> = Vec::new();
            let mut next_seq = [0u64; 3];
            let mut last_batch: [Option<(u64, usize, u64)>; 3] = [None; 3];
            for (i, (pid, n, retry)) in ops.into_iter().enumerate() {
                let log_index = i as u64 + 1;
                let mut kv = KvBatch::default();
                let pid_ix = pid as usize;
                let (seq, n) = match (retry, last_batch[pid_ix]) {
                    (true, Some((seq, n, _))) if pid != 0 => (seq, n),
                    _ => (next_seq[pid_ix], n),
                };
                let before = st.meta.next_offset;
                let reply = st.apply(log_index, batch(pid, seq, n), &mut kv);
                match reply {
                    PartitionReply::Produced { base_offset, count, duplicate: false } => {
                        prop_assert_eq!(base_offset, before);
                        prop_assert_eq!(count as usize, n);
                        prop_assert_eq!(st.meta.next_offset, before + n as u64);
                        let e = kv.ops.iter().find_map(|(k, v)| v.as_ref().and_then(|v| IndexEntry::decode(k, v)));
                        let ts = Some(seq as i64);
                        prop_assert_eq!(e, Some(IndexEntry { base_offset, log_index, count, max_timestamp_ms: ts, skip: 0 }));
                        index.push(IndexEntry { base_offset, log_index, count, max_timestamp_ms: ts, skip: 0 });
                        next_seq[pid_ix] = seq + n as u64;
                        last_batch[pid_ix] = Some((seq, n, base_offset));
                    }
                    PartitionReply::Produced { base_offset, duplicate: true, .. } => {
                        prop_assert!(retry && pid != 0);
                        prop_assert_eq!(Some(base_offset), last_batch[pid_ix].map(|b| b.2));
                        prop_assert_eq!(st.meta.next_offset, before);
                        prop_assert!(kv.is_empty());
                    }
                    other => prop_assert!(false, "unexpected reply {:?}", other),
                }
            }
            // Dense: each batch starts where the previous one ended.
            let mut expect = 0;
            for e in &index {
                prop_assert_eq!(e.base_offset, expect);
                expect += u64::from(e.count);
            }
            prop_assert_eq!(expect, st.meta.next_offset);
        }
    }

    proptest! {
        /// Whatever the order of timestamps, the time index finds the first record at or after
        /// any time, before and after the log start advances (to batch boundaries or not).
        #[test]
        fn time_lookup_finds_the_first_record_at_or_after(
            batches in proptest::collection::vec(proptest::collection::vec(0i64..50, 1..4), 1..30),
            advances in proptest::collection::vec(0u64..120, 0..4),
        ) {
            let (mut st, t) = applied(&batches);
            let records: Vec<i64> = batches.iter().flatten().copied().collect();
            let mut log_index = 2 * batches.len() as u64 + 1;
            for advance in std::iter::once(None).chain(advances.into_iter().map(Some)) {
                if let Some(offset) = advance {
                    let mut kv = KvBatch::default();
                    st.advance_log_start(log_index, offset, t.as_ref(), &mut kv).expect("advance");
                    t.apply(kv).expect("apply");
                    log_index += 1;
                }
                let start = st.meta.log_start_offset;
                for ts in -1..52 {
                    let expect = (start..st.meta.next_offset).find(|o| records[*o as usize] >= ts);
                    prop_assert_eq!(lookup(&st, t.as_ref(), &records, ts), expect, "time {} from {}", ts, start);
                }
                let kept = records[start as usize..].iter().copied().max();
                prop_assert_eq!(st.meta.max_timestamp_ms, kept);
            }
        }
    }

    #[test]
    fn advancing_the_log_start_forgets_whole_batches_and_names_the_purge_point() {
        // Batches at offsets 0, 3, 5, 6 (log indexes 1, 3, 5, 7); high watermark 10.
        let (mut st, t) = applied(&[vec![1, 2, 3], vec![4, 5], vec![6], vec![7, 8, 9, 10]]);
        let advance = |st: &mut PartitionState, log_index: u64, offset: u64| {
            let mut kv = KvBatch::default();
            let reply = st.advance_log_start(log_index, offset, t.as_ref(), &mut kv).expect("advance");
            t.apply(kv).expect("apply");
            reply
        };
        // Inside the second batch: rounded down to its start.
        assert_eq!(advance(&mut st, 9, 4), PartitionReply::LogStart { log_start_offset: 3 });
        assert_eq!(index_offsets(t.as_ref()), [3, 5, 6]);
        assert_eq!(st.meta.purge_index, Some(2));
        // Backwards or in place: nothing changes.
        assert_eq!(advance(&mut st, 10, 1), PartitionReply::LogStart { log_start_offset: 3 });
        assert_eq!(advance(&mut st, 11, 3), PartitionReply::LogStart { log_start_offset: 3 });
        assert_eq!(st.meta.purge_index, Some(2));
        assert_eq!(advance(&mut st, 12, 6), PartitionReply::LogStart { log_start_offset: 6 });
        assert_eq!(index_offsets(t.as_ref()), [6]);
        assert_eq!(st.meta.purge_index, Some(6));
        // Past the high watermark: everything goes, up to the entry before the command.
        assert_eq!(advance(&mut st, 13, 99), PartitionReply::LogStart { log_start_offset: 10 });
        assert_eq!(index_offsets(t.as_ref()), Vec::<u64>::new());
        assert_eq!(st.meta.purge_index, Some(12));
        assert_eq!(st.meta.max_timestamp_ms, None);
        assert_eq!(first_batch_at_or_after(t.as_ref(), i64::MIN, 10, 10).expect("lookup"), None);
        // The log goes on at the high watermark, indexed as before.
        let mut kv = KvBatch::default();
        st.apply(14, batch(0, 5, 2), &mut kv);
        t.apply(kv).expect("apply");
        assert_eq!(index_offsets(t.as_ref()), [10]);
        let e = first_batch_at_or_after(t.as_ref(), 0, 10, 12).expect("lookup");
        assert_eq!(e.map(|e| (e.base_offset, e.log_index)), Some((10, 14)));
    }

    #[test]
    fn index_values_of_the_first_format_decode_without_a_timestamp() {
        let e = IndexEntry { base_offset: 4, log_index: 9, count: 2, max_timestamp_ms: Some(-5), skip: 0 };
        assert_eq!(IndexEntry::decode(&offset_key(4), &e.value()), Some(e));
        let later = IndexEntry { skip: 3, ..e };
        assert_eq!(later.value().len(), 24);
        assert_eq!(IndexEntry::decode(&offset_key(4), &later.value()), Some(later));
        let v1 = &e.value()[..12];
        assert_eq!(IndexEntry::decode(&offset_key(4), v1), Some(IndexEntry { max_timestamp_ms: None, ..e }));
        assert_eq!(IndexEntry::decode(&offset_key(4), &e.value()[..15]), None);
    }

    #[test]
    fn state_of_the_first_format_decodes() {
        #[derive(Serialize)]
        struct V1 {
            last_applied: Option<LogId>,
            next_offset: u64,
            log_start_offset: u64,
        }
        let old = postcard::to_stdvec(&V1 { last_applied: None, next_offset: 42, log_start_offset: 0 })
            .expect("encode");
        let m = PartitionMeta::decode(&old).expect("decode");
        assert_eq!((m.next_offset, m.purge_index, m.max_timestamp_ms), (42, None, None));
        let new = PartitionMeta { next_offset: 7, purge_index: Some(3), max_timestamp_ms: Some(-1), ..m };
        assert_eq!(PartitionMeta::decode(&sm_common::encode(&new)).expect("decode"), new);
        // A newer build's state (tagged, version 1) is refused by its version, never misread.
        let mut newer = PARTITION_STATE.tag.to_vec();
        newer.push(1);
        newer.extend_from_slice(&sm_common::encode(&new));
        let e = PartitionMeta::decode(&newer).expect_err("a newer version");
        assert!(e.to_string().contains("the partition state is in format version 1"), "{e}");
    }

    #[test]
    fn an_index_entry_that_does_not_decode_fails_the_scan_instead_of_leaving_a_gap() {
        let (_, t) = applied(&[vec![1], vec![2, 3], vec![4]]);
        assert_eq!(index_offsets(t.as_ref()), vec![0, 1, 3]);
        let mut kv = KvBatch::default();
        kv.put(offset_key(1).to_vec(), vec![0u8; 15]);
        t.apply(kv).expect("apply");
        let scanned: Vec<io::Result<IndexEntry>> = IndexScan::new(t.as_ref(), 0, u64::MAX).collect();
        assert_eq!(scanned.len(), 2, "the entry before, then the error: {scanned:?}");
        assert_eq!(scanned[0].as_ref().expect("entry 0").base_offset, 0);
        let e = scanned[1].as_ref().expect_err("entry 1 does not decode");
        assert!(e.to_string().contains("has a value of 15 bytes"), "{e}");
    }

    #[test]
    fn gaps_and_empty_batches_are_refused() {
        let mut st = PartitionState::default();
        let mut kv = KvBatch::default();
        assert!(matches!(st.apply(1, batch(9, 0, 2), &mut kv), PartitionReply::Produced { .. }));
        assert_eq!(
            st.apply(2, batch(9, 5, 1), &mut kv),
            PartitionReply::OutOfOrderSequence { expected: 2, got: 5 }
        );
        assert!(matches!(st.apply(3, batch(9, 2, 0), &mut kv), PartitionReply::Invalid(_)));
        assert_eq!(st.meta.next_offset, 2);
    }
}
