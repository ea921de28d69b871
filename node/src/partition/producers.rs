//! The idempotent-producer table of a partition: which batches each producer has written, so a
//! retried batch is answered with its original offsets instead of being appended again.
//!
//! The table is bounded: at most [`PRODUCERS_MAX`] producers, each with its last
//! [`BATCHES_PER_PRODUCER`] batches. When full, the producer that wrote least recently (by log
//! index, so every replica evicts the same one) is forgotten. A producer the table does not know
//! may start only at sequence 0 (in entries of the current format; earlier entries accepted any
//! first sequence): pipelined batches of a new producer that reach the log out of order are then
//! refused instead of written out of order, and a forgotten producer is told so and starts
//! afresh with a new id.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::VecDeque;

use serde::Deserialize;
use serde::Serialize;

pub const PRODUCERS_MAX: usize = 10_000;
pub const BATCHES_PER_PRODUCER: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub base_sequence: u64,
    pub count: u32,
    pub base_offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEntry {
    /// Log index of the producer's last batch, for eviction order.
    pub last_index: u64,
    pub batches: VecDeque<BatchRecord>,
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    Accept,
    /// Already written at these offsets.
    Duplicate {
        base_offset: u64,
        count: u32,
    },
    /// Not the next sequence and not a remembered batch.
    OutOfOrder {
        expected: u64,
    },
    /// The producer is not in the table and the batch does not start at sequence 0.
    UnknownProducer,
}

/// A change to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProducerChange {
    Put(u64, ProducerEntry),
    Evict(u64),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerTable {
    producers: BTreeMap<u64, ProducerEntry>,
    by_recency: BTreeSet<(u64, u64)>,
}

impl ProducerTable {
    pub fn from_entries(entries: impl IntoIterator<Item = (u64, ProducerEntry)>) -> Self {
        let mut t = Self::default();
        for (id, e) in entries {
            t.by_recency.insert((e.last_index, id));
            t.producers.insert(id, e);
        }
        t
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = (&u64, &ProducerEntry)> {
        self.producers.iter()
    }

    /// What to do with a batch; `strict`: an unknown producer must start at sequence 0.
    pub fn check(&self, producer_id: u64, base_sequence: u64, count: u32, strict: bool) -> SequenceCheck {
        let unknown =
            if strict && base_sequence != 0 { SequenceCheck::UnknownProducer } else { SequenceCheck::Accept };
        let Some(e) = self.producers.get(&producer_id) else {
            return unknown;
        };
        let Some(last) = e.batches.back() else {
            return unknown;
        };
        let expected = last.base_sequence + u64::from(last.count);
        if base_sequence == expected {
            return SequenceCheck::Accept;
        }
        match e.batches.iter().find(|b| b.base_sequence == base_sequence && b.count == count) {
            Some(b) => SequenceCheck::Duplicate { base_offset: b.base_offset, count: b.count },
            None => SequenceCheck::OutOfOrder { expected },
        }
    }

    /// Records an accepted batch written at `base_offset` by the entry at `log_index`.
    pub fn record(
        &mut self,
        producer_id: u64,
        batch: BatchRecord,
        log_index: u64,
        changes: &mut Vec<ProducerChange>,
    ) {
        let e = self.producers.entry(producer_id).or_default();
        self.by_recency.remove(&(e.last_index, producer_id));
        e.last_index = log_index;
        e.batches.push_back(batch);
        while e.batches.len() > BATCHES_PER_PRODUCER {
            e.batches.pop_front();
        }
        self.by_recency.insert((log_index, producer_id));
        changes.push(ProducerChange::Put(producer_id, e.clone()));
        while self.producers.len() > PRODUCERS_MAX {
            let (idx, victim) = *self.by_recency.iter().next().expect("table is not empty");
            self.by_recency.remove(&(idx, victim));
            self.producers.remove(&victim);
            changes.push(ProducerChange::Evict(victim));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rec(t: &mut ProducerTable, pid: u64, seq: u64, count: u32, off: u64, idx: u64) {
        t.record(pid, BatchRecord { base_sequence: seq, count, base_offset: off }, idx, &mut Vec::new());
    }

    #[test]
    fn sequences() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check(7, 0, 3, true), SequenceCheck::Accept);
        assert_eq!(t.check(7, 3, 2, true), SequenceCheck::UnknownProducer);
        assert_eq!(t.check(7, 3, 2, false), SequenceCheck::Accept);
        rec(&mut t, 7, 0, 3, 100, 1);
        assert_eq!(t.check(7, 3, 2, true), SequenceCheck::Accept);
        assert_eq!(t.check(7, 0, 3, true), SequenceCheck::Duplicate { base_offset: 100, count: 3 });
        assert_eq!(t.check(7, 5, 1, true), SequenceCheck::OutOfOrder { expected: 3 });
        assert_eq!(t.check(7, 1, 3, true), SequenceCheck::OutOfOrder { expected: 3 });
        for i in 0..10 {
            rec(&mut t, 7, 3 + i, 1, 103 + i, 2 + i);
        }
        // Only the last five batches are remembered.
        assert_eq!(t.check(7, 0, 3, true), SequenceCheck::OutOfOrder { expected: 13 });
        assert_eq!(t.check(7, 12, 1, true), SequenceCheck::Duplicate { base_offset: 112, count: 1 });
    }

    proptest! {
        /// However a producer's batches are retried (any batch of the last few, any number of
        /// times, interleaved with new ones), each sequence number is written exactly once and
        /// retries get the offsets of the first write.
        #[test]
        fn retries_never_duplicate(ops in proptest::collection::vec((0u8..3, 1u32..4, 0usize..5), 1..200)) {
            let mut t = ProducerTable::default();
            let mut next_offset = 0u64;
            let mut next_seq = 0u64;
            let mut sent: Vec<(u64, u32)> = Vec::new();
            let mut written: BTreeMap<u64, u64> = BTreeMap::new(); // seq -> offset
            for (i, (kind, count, back)) in ops.into_iter().enumerate() {
                let (seq, count) = if kind == 0 || sent.is_empty() {
                    let s = (next_seq, count);
                    next_seq += u64::from(count);
                    sent.push(s);
                    s
                } else {
                    sent[sent.len() - 1 - back.min(sent.len() - 1).min(BATCHES_PER_PRODUCER - 1)]
                };
                match t.check(1, seq, count, true) {
                    SequenceCheck::Accept => {
                        for k in 0..u64::from(count) {
                            prop_assert!(written.insert(seq + k, next_offset + k).is_none(), "seq {} written twice", seq + k);
                        }
                        rec(&mut t, 1, seq, count, next_offset, i as u64);
                        next_offset += u64::from(count);
                    }
                    SequenceCheck::Duplicate { base_offset, count: c } => {
                        prop_assert_eq!(c, count);
                        prop_assert_eq!(written.get(&seq).copied(), Some(base_offset));
                    }
                    SequenceCheck::OutOfOrder { .. } | SequenceCheck::UnknownProducer => {
                        prop_assert!(false, "retry of a recent batch refused")
                    }
                }
            }
            prop_assert_eq!(written.len() as u64, next_offset);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        #[test]
        fn eviction_is_bounded_and_by_recency(n in 1usize..50) {
            let mut t = ProducerTable::default();
            let total = PRODUCERS_MAX + n;
            let mut changes = Vec::new();
            for pid in 0..total as u64 {
                t.record(pid, BatchRecord { base_sequence: 0, count: 1, base_offset: pid }, pid, &mut changes);
            }
            prop_assert_eq!(t.len(), PRODUCERS_MAX);
            let evicted: Vec<u64> = changes.iter().filter_map(|c| match c { ProducerChange::Evict(p) => Some(*p), _ => None }).collect();
            prop_assert_eq!(evicted, (0..n as u64).collect::<Vec<_>>());
        }
    }
}
