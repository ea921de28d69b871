//! A partition's replicated state and the deterministic rules that change it: offset
//! assignment and idempotent-producer deduplication.
//!
//! Offsets are assigned when an entry is applied: a batch of `n` records accepted at next offset
//! `o` occupies `[o, o + n)`. The state store maps each accepted batch's base offset to the log
//! index of its entry (the *offset index*), which is how a fetch finds records in the Raft log.
//! A duplicate or refused batch stays in the log but gets no offsets and no index entry.

use eddy_raft::LogId;
use eddy_raft::StoredMembership;
use eddy_raft::kv::KvBatch;
use serde::Deserialize;
use serde::Serialize;

use super::command::PartitionReply;
use super::command::ProduceHeader;
use super::producers::BatchRecord;
use super::producers::ProducerChange;
use super::producers::ProducerTable;
use super::producers::SequenceCheck;
use crate::sm_common;

pub const META_KEY: &[u8] = b"m";
pub const MEMBERSHIP_KEY: &[u8] = b"mb";
const PRODUCER_PREFIX: u8 = b'p';
const OFFSET_PREFIX: u8 = b'o';

/// Key of the offset-index entry for the batch starting at `offset`.
pub fn offset_key(offset: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = OFFSET_PREFIX;
    k[1..].copy_from_slice(&offset.to_be_bytes());
    k
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
}

impl IndexEntry {
    pub fn value(&self) -> [u8; 12] {
        let mut v = [0u8; 12];
        v[..8].copy_from_slice(&self.log_index.to_be_bytes());
        v[8..].copy_from_slice(&self.count.to_be_bytes());
        v
    }

    pub fn decode(key: &[u8], value: &[u8]) -> Option<Self> {
        if key.len() != 9 || key[0] != OFFSET_PREFIX || value.len() != 12 {
            return None;
        }
        Some(Self {
            base_offset: u64::from_be_bytes(key[1..].try_into().ok()?),
            log_index: u64::from_be_bytes(value[..8].try_into().ok()?),
            count: u32::from_be_bytes(value[8..].try_into().ok()?),
        })
    }
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
        let count = b.count;
        if count == 0 {
            return PartitionReply::Invalid("records: a batch needs at least one record".into());
        }
        if b.producer_id != 0 {
            match self.producers.check(b.producer_id, b.base_sequence, count) {
                SequenceCheck::Accept => {}
                SequenceCheck::Duplicate { base_offset, count } => {
                    return PartitionReply::Produced { base_offset, count, duplicate: true };
                }
                SequenceCheck::OutOfOrder { expected } => {
                    return PartitionReply::OutOfOrderSequence { expected, got: b.base_sequence };
                }
            }
        }
        let base_offset = self.meta.next_offset;
        self.meta.next_offset += u64::from(count);
        batch.put(offset_key(base_offset), IndexEntry { base_offset, log_index, count }.value());
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
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn batch(pid: u64, seq: u64, n: usize) -> ProduceHeader {
        ProduceHeader { producer_id: pid, base_sequence: seq, count: n as u32 }
    }

    proptest! {
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
                        prop_assert_eq!(e, Some(IndexEntry { base_offset, log_index, count }));
                        index.push(IndexEntry { base_offset, log_index, count });
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
