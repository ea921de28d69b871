//! Commands of a partition group and their replies, as they travel in Raft entries.
//!
//! A produce request becomes one [`PartitionCommand::Produce`] entry holding the whole record
//! batch; offsets are not in the entry but assigned when it is applied. Requests that queue on a
//! busy leader are proposed together as one [`PartitionCommand::ProduceBatches`] entry (one Raft
//! round for all of them), each keeping its own sequence check and reply. Retention proposes
//! [`PartitionCommand::AdvanceLogStart`], so every replica forgets the same records.

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
    pub timestamp_ms: i64,
}

impl StoredRecord {
    /// The bytes a record counts against size limits: key, value and headers.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, |k| k.len())
            + self.value.len()
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceBatch {
    /// 0 for a non-idempotent batch.
    pub producer_id: u64,
    pub base_sequence: u64,
    pub records: Vec<StoredRecord>,
}

impl ProduceBatch {
    /// Whether `next` may follow this batch in one [`PartitionCommand::ProduceBatches`] entry:
    /// both non-idempotent, or the same producer's next sequence.
    pub fn coalescible(&self, next: &ProduceBatch) -> bool {
        self.producer_id == next.producer_id
            && (self.producer_id == 0
                || self.base_sequence.checked_add(self.records.len() as u64) == Some(next.base_sequence))
    }
}

/// A command of a partition group, as a proposer builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionCommand {
    Produce(ProduceBatch),
    /// Several produce requests in one entry, applied one after the other as if each were an
    /// entry of its own. Either all non-idempotent (producer id 0), or all of one producer with
    /// contiguous sequences in order (`coalescible` says which batches may follow which).
    ProduceBatches(Vec<ProduceBatch>),
    /// Retention: records below `offset` are no longer served, and the log entries holding
    /// only such records may be purged. `offset` is a batch's base offset or the high watermark.
    AdvanceLogStart {
        offset: u64,
    },
}

/// What applying a produce entry needs, readable without decoding the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceHeader {
    pub producer_id: u64,
    pub base_sequence: u64,
    pub count: u32,
    /// The greatest record timestamp of the batch; `None` in entries written before the header
    /// carried it (the records then tell).
    pub max_timestamp_ms: Option<i64>,
    /// Whether a producer the partition does not know must start at sequence 0 (entries of the
    /// current format). Entries written before accepted any first sequence; they are applied
    /// as they were, so every replica replays the same log to the same state.
    pub strict_sequence: bool,
}

/// One request's batch inside a [`PartitionCommand::ProduceBatches`] entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubBatch {
    pub count: u32,
    pub max_timestamp_ms: i64,
}

/// What applying an entry needs, readable without decoding the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandHeader {
    Produce(ProduceHeader),
    /// The header describes the whole entry (the first batch's producer and sequence, every
    /// record); the sub-batches follow each other in the records and in sequence.
    ProduceBatches(ProduceHeader, Vec<SubBatch>),
    AdvanceLogStart {
        offset: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionReply {
    /// For blank and membership entries.
    Done,
    Produced {
        base_offset: u64,
        count: u32,
        duplicate: bool,
    },
    /// For [`PartitionCommand::AdvanceLogStart`]: the log start offset after applying it.
    LogStart {
        log_start_offset: u64,
    },
    OutOfOrderSequence {
        expected: u64,
        got: u64,
    },
    Invalid(String),
    /// The partition knows nothing of the producer (new, or forgotten) and the batch does not
    /// start at sequence 0.
    UnknownProducer {
        got: u64,
    },
    /// For [`PartitionCommand::ProduceBatches`]: each batch's reply, in order.
    Batches(Vec<PartitionReply>),
}

/// Why an entry's bytes are not a command this version understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable partition command: {0}")]
pub struct DecodeError(String);

/// A produce entry whose header has no timestamp (written by earlier versions).
const KIND_PRODUCE_V1: u8 = 1;
/// A produce entry with the timestamp, applied without the first-sequence rule (earlier
/// versions).
const KIND_PRODUCE_V2: u8 = 2;
const KIND_ADVANCE_LOG_START: u8 = 3;
/// The layout of [`KIND_PRODUCE_V2`]; applying it refuses an unknown producer's batch that does
/// not start at sequence 0 (so pipelined requests that reach the log out of order cannot
/// reorder a new producer's records).
const KIND_PRODUCE: u8 = 4;
/// The header of [`KIND_PRODUCE`] for the whole entry, then the number of batches (4) and each
/// batch's record count (4) and greatest timestamp (8), then every record.
const KIND_PRODUCE_BATCHES: u8 = 5;
/// kind (1) + producer id (8) + base sequence (8) + record count (4).
const PRODUCE_V1_HEADER_BYTES: usize = 21;
/// The v1 header + the greatest record timestamp (8).
const PRODUCE_HEADER_BYTES: usize = 29;
/// kind (1) + offset (8).
const ADVANCE_LOG_START_BYTES: usize = 9;

impl PartitionCommand {
    /// The entry encoding: a fixed header, then the records (postcard). Every replica applies
    /// every entry, and applying reads only the header.
    pub fn encode(&self) -> Bytes {
        let max_ts =
            |records: &[StoredRecord]| records.iter().map(|r| r.timestamp_ms).max().unwrap_or(i64::MIN);
        let capacity = |records: &mut dyn Iterator<Item = &StoredRecord>| {
            PRODUCE_HEADER_BYTES + records.map(|r| r.size() + 16).sum::<usize>()
        };
        // The produce header: kind, producer, first sequence, records, greatest timestamp.
        let header = |kind: u8, (producer_id, sequence): (u64, u64), count: usize, max_ts: i64, capacity| {
            let mut out = Vec::with_capacity(capacity);
            out.push(kind);
            out.extend_from_slice(&producer_id.to_le_bytes());
            out.extend_from_slice(&sequence.to_le_bytes());
            out.extend_from_slice(&(count as u32).to_le_bytes());
            out.extend_from_slice(&max_ts.to_le_bytes());
            out
        };
        match self {
            PartitionCommand::Produce(b) => {
                let cap = capacity(&mut b.records.iter());
                let first = (b.producer_id, b.base_sequence);
                let mut out = header(KIND_PRODUCE, first, b.records.len(), max_ts(&b.records), cap);
                postcard::to_io(&b.records, &mut out).expect("records always encode");
                out.into()
            }
            PartitionCommand::ProduceBatches(batches) => {
                let records = || batches.iter().flat_map(|b| &b.records);
                let maxes: Vec<i64> = batches.iter().map(|b| max_ts(&b.records)).collect();
                let count = records().count();
                let first = batches.first().map_or((0, 0), |b| (b.producer_id, b.base_sequence));
                let cap = capacity(&mut records()) + 4 + 12 * batches.len();
                let all_max = maxes.iter().copied().max().unwrap_or(i64::MIN);
                let mut out = header(KIND_PRODUCE_BATCHES, first, count, all_max, cap);
                out.extend_from_slice(&(batches.len() as u32).to_le_bytes());
                for (b, max) in batches.iter().zip(maxes) {
                    out.extend_from_slice(&(b.records.len() as u32).to_le_bytes());
                    out.extend_from_slice(&max.to_le_bytes());
                }
                // The records of every batch, as one sequence (postcard's layout of a `Vec`).
                let mut len = [0u8; 10];
                out.extend_from_slice(
                    postcard::to_slice(&(count as u64), &mut len).expect("a varint fits 10 bytes"),
                );
                for r in records() {
                    postcard::to_io(r, &mut out).expect("records always encode");
                }
                out.into()
            }
            PartitionCommand::AdvanceLogStart { offset } => {
                let mut out = Vec::with_capacity(ADVANCE_LOG_START_BYTES);
                out.push(KIND_ADVANCE_LOG_START);
                out.extend_from_slice(&offset.to_le_bytes());
                out.into()
            }
        }
    }

    /// The header of an entry.
    pub fn decode_header(b: &[u8]) -> Result<CommandHeader, DecodeError> {
        if b.first() == Some(&KIND_PRODUCE_BATCHES) {
            let (h, subs) = Self::decode_batches_header(b)?;
            return Ok(CommandHeader::ProduceBatches(h, subs));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let bad = || DecodeError(format!("{} bytes, kind {:?}", b.len(), b.first()));
        match b.first() {
            Some(&KIND_ADVANCE_LOG_START) if b.len() == ADVANCE_LOG_START_BYTES => {
                Ok(CommandHeader::AdvanceLogStart { offset: u64_at(1) })
            }
            Some(&kind @ (KIND_PRODUCE | KIND_PRODUCE_V2 | KIND_PRODUCE_V1)) => {
                let len =
                    if kind == KIND_PRODUCE_V1 { PRODUCE_V1_HEADER_BYTES } else { PRODUCE_HEADER_BYTES };
                if b.len() < len {
                    return Err(bad());
                }
                let max_timestamp_ms = (kind != KIND_PRODUCE_V1).then(|| u64_at(21) as i64);
                Ok(CommandHeader::Produce(ProduceHeader {
                    producer_id: u64_at(1),
                    base_sequence: u64_at(9),
                    count: u32::from_le_bytes(b[17..21].try_into().expect("4 bytes")),
                    max_timestamp_ms,
                    strict_sequence: kind == KIND_PRODUCE,
                }))
            }
            _ => Err(bad()),
        }
    }

    /// The header and sub-batches of a [`KIND_PRODUCE_BATCHES`] entry.
    fn decode_batches_header(b: &[u8]) -> Result<(ProduceHeader, Vec<SubBatch>), DecodeError> {
        let bad = |what: &str| DecodeError(format!("{} bytes, several batches: {what}", b.len()));
        let u32_at = |i: usize| b.get(i..i + 4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")));
        let u64_at = |i: usize| b.get(i..i + 8).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")));
        let (Some(producer_id), Some(base_sequence), Some(count), Some(max_ts), Some(n)) =
            (u64_at(1), u64_at(9), u32_at(17), u64_at(21), u32_at(PRODUCE_HEADER_BYTES))
        else {
            return Err(bad("short header"));
        };
        let start = batches_records_start(n as usize);
        if b.len() < start {
            return Err(bad(&format!("{n} batches")));
        }
        let at = batches_records_start;
        let subs: Vec<SubBatch> = (0..n as usize)
            .map(|i| SubBatch {
                count: u32_at(at(i)).expect("in bounds"),
                max_timestamp_ms: u64_at(at(i) + 4).expect("in bounds") as i64,
            })
            .collect();
        if subs.iter().map(|s| u64::from(s.count)).sum::<u64>() != u64::from(count) {
            return Err(bad("the batches' counts do not add up to the entry's"));
        }
        let h = ProduceHeader {
            producer_id,
            base_sequence,
            count,
            max_timestamp_ms: Some(max_ts as i64),
            strict_sequence: true,
        };
        Ok((h, subs))
    }

    /// The whole batch of a produce entry (every record of an entry of several batches). Keys,
    /// values and header values are slices of `b` (no copy): a fetch hands the bytes it read
    /// from the log to the response as they are.
    pub fn decode_batch(b: &Bytes) -> Result<ProduceBatch, DecodeError> {
        let (h, start) = match Self::decode_header(b)? {
            CommandHeader::Produce(h) => {
                (h, if h.max_timestamp_ms.is_some() { PRODUCE_HEADER_BYTES } else { PRODUCE_V1_HEADER_BYTES })
            }
            CommandHeader::ProduceBatches(h, subs) => (h, batches_records_start(subs.len())),
            CommandHeader::AdvanceLogStart { .. } => return Err(DecodeError("not a produce entry".into())),
        };
        let records = RecordsReader { buf: b, at: start }.records()?;
        if records.len() != h.count as usize {
            return Err(DecodeError(format!("header says {} records, found {}", h.count, records.len())));
        }
        Ok(ProduceBatch { producer_id: h.producer_id, base_sequence: h.base_sequence, records })
    }
}

/// Where the records of a [`KIND_PRODUCE_BATCHES`] entry of `n` batches start (also where its
/// `n`-th batch's count and timestamp would be).
fn batches_records_start(n: usize) -> usize {
    PRODUCE_HEADER_BYTES + 4 + 12 * n
}

/// Reads the records of a produce entry, written by postcard as a `Vec<StoredRecord>`, handing
/// out slices of the entry instead of copies. The layout is postcard's (stable, its wire format
/// 1.0): a sequence is a varint length and its elements; bytes and strings a varint length and
/// the bytes; an option a 0/1 tag; an `i64` a zigzag varint. A test holds this reader to
/// postcard's own decoder for any records.
struct RecordsReader<'a> {
    buf: &'a Bytes,
    at: usize,
}

impl RecordsReader<'_> {
    fn records(mut self) -> Result<Vec<StoredRecord>, DecodeError> {
        let n = self.len()?;
        // Every record takes at least 4 bytes, so a corrupt length cannot reserve much.
        let mut out = Vec::with_capacity(n.min((self.buf.len() - self.at) / 4));
        for _ in 0..n {
            let key = match self.byte()? {
                0 => None,
                1 => Some(self.bytes()?),
                t => return Err(self.error(&format!("option tag {t}"))),
            };
            let value = self.bytes()?;
            let headers = (0..self.len()?)
                .map(|_| {
                    let k = self.bytes()?;
                    let k = std::str::from_utf8(&k)
                        .map_err(|_| self.error("a header name that is not UTF-8"))?
                        .to_owned();
                    Ok((k, self.bytes()?))
                })
                .collect::<Result<Vec<_>, DecodeError>>()?;
            let z = self.varint()?;
            let timestamp_ms = ((z >> 1) as i64) ^ -((z & 1) as i64);
            out.push(StoredRecord { key, value, headers, timestamp_ms });
        }
        if self.at != self.buf.len() {
            return Err(self.error("bytes after the last record"));
        }
        Ok(out)
    }

    fn error(&self, what: &str) -> DecodeError {
        DecodeError(format!("records: {what} at byte {} of {}", self.at, self.buf.len()))
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.at).ok_or_else(|| self.error("end of entry"))?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.error("a varint longer than 10 bytes"))
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.buf.len())
            .ok_or_else(|| self.error(&format!("length {n}")))
    }

    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.len()?;
        if self.buf.len() - self.at < n {
            return Err(self.error(&format!("{n} bytes past the end")));
        }
        let b = self.buf.slice(self.at..self.at + n);
        self.at += n;
        Ok(b)
    }
}

impl PartitionReply {
    pub fn encode(&self) -> Bytes {
        postcard::to_stdvec(self).expect("partition replies always encode").into()
    }

    pub fn decode(b: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn produce_round_trips_and_the_header_reads_alone() {
        let r = StoredRecord {
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::from_static(b"v"),
            headers: vec![("h".into(), Bytes::new())],
            timestamp_ms: 7,
        };
        let late = StoredRecord { timestamp_ms: 9, ..r.clone() };
        let b = ProduceBatch { producer_id: 3, base_sequence: 9, records: vec![r.clone(), late, r.clone()] };
        // The header this batch reads as, by format.
        let header = |max_timestamp_ms, strict_sequence| {
            Ok(CommandHeader::Produce(ProduceHeader {
                producer_id: 3,
                base_sequence: 9,
                count: 3,
                max_timestamp_ms,
                strict_sequence,
            }))
        };
        let bytes = PartitionCommand::Produce(b.clone()).encode();
        assert_eq!(PartitionCommand::decode_header(&bytes), header(Some(9), true));
        assert_eq!(PartitionCommand::decode_batch(&bytes), Ok(b.clone()));
        assert!(PartitionCommand::decode_header(&bytes[..10]).is_err());
        assert!(PartitionCommand::decode_batch(&bytes.slice(..bytes.len() - 1)).is_err());

        // An entry of the first format (no timestamp in the header) still reads.
        let mut v1 = vec![KIND_PRODUCE_V1];
        v1.extend_from_slice(&bytes[1..21]);
        v1.extend_from_slice(&bytes[29..]);
        assert_eq!(PartitionCommand::decode_header(&v1), header(None, false));
        assert_eq!(PartitionCommand::decode_batch(&Bytes::from(v1)), Ok(b.clone()));

        // So does one of the second format, applied without the first-sequence rule.
        let mut v2 = bytes.to_vec();
        v2[0] = KIND_PRODUCE_V2;
        assert_eq!(PartitionCommand::decode_header(&v2), header(Some(9), false));
        assert_eq!(PartitionCommand::decode_batch(&Bytes::from(v2)), Ok(b));
    }

    fn any_record() -> impl Strategy<Value = StoredRecord> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        (
            proptest::option::of(bytes()),
            bytes(),
            proptest::collection::vec((".{0,20}", bytes()), 0..4),
            any::<i64>(),
        )
            .prop_map(|(key, value, headers, timestamp_ms)| StoredRecord {
                key,
                value,
                headers,
                timestamp_ms,
            })
    }

    proptest! {
        /// The slicing reader reads what postcard wrote exactly as postcard's own decoder does,
        /// and refuses every truncation of it without panicking.
        #[test]
        fn records_read_without_copies_match_postcard(
            records in proptest::collection::vec(any_record(), 0..40),
            cut in any::<proptest::sample::Index>(),
        ) {
            let b = ProduceBatch { producer_id: 7, base_sequence: 0, records };
            let bytes = PartitionCommand::Produce(b.clone()).encode();
            let by_postcard: Vec<StoredRecord> = postcard::from_bytes(&bytes[PRODUCE_HEADER_BYTES..]).unwrap();
            prop_assert_eq!(&by_postcard, &b.records);
            let decoded = PartitionCommand::decode_batch(&bytes).unwrap();
            prop_assert_eq!(&decoded, &b);
            // The values are views of the entry's bytes, not copies.
            for r in decoded.records.iter().filter(|r| !r.value.is_empty()) {
                let at = r.value.as_ptr() as usize - bytes.as_ptr() as usize;
                prop_assert!(at < bytes.len());
            }
            let short = cut.index(bytes.len() - PRODUCE_HEADER_BYTES) + PRODUCE_HEADER_BYTES;
            prop_assert!(PartitionCommand::decode_batch(&bytes.slice(..short)).is_err());
        }

        /// An entry of several batches tells each batch's count and greatest timestamp from its
        /// header, holds every record in order, and refuses every truncation.
        #[test]
        fn several_batches_in_one_entry_round_trip(
            batches in proptest::collection::vec(proptest::collection::vec(any_record(), 1..8), 1..6),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut seq = 40;
            let batches: Vec<ProduceBatch> = batches
                .into_iter()
                .map(|records| {
                    let b = ProduceBatch { producer_id: 9, base_sequence: seq, records };
                    seq += b.records.len() as u64;
                    b
                })
                .collect();
            prop_assert!(batches.windows(2).all(|w| w[0].coalescible(&w[1])));
            let bytes = PartitionCommand::ProduceBatches(batches.clone()).encode();
            let all: Vec<StoredRecord> = batches.iter().flat_map(|b| b.records.clone()).collect();
            let Ok(CommandHeader::ProduceBatches(h, subs)) = PartitionCommand::decode_header(&bytes) else {
                panic!("an entry of several batches");
            };
            prop_assert_eq!((h.producer_id, h.base_sequence, h.count as usize), (9, 40, all.len()));
            prop_assert_eq!(h.max_timestamp_ms, all.iter().map(|r| r.timestamp_ms).max());
            let want: Vec<SubBatch> = batches
                .iter()
                .map(|b| SubBatch {
                    count: b.records.len() as u32,
                    max_timestamp_ms: b.records.iter().map(|r| r.timestamp_ms).max().unwrap(),
                })
                .collect();
            prop_assert_eq!(subs, want);
            let decoded = PartitionCommand::decode_batch(&bytes).unwrap();
            prop_assert_eq!(decoded.records, all);
            let short = cut.index(bytes.len());
            prop_assert!(PartitionCommand::decode_batch(&bytes.slice(..short)).is_err());
        }
    }

    #[test]
    fn advance_log_start_round_trips_and_is_not_a_batch() {
        let bytes = PartitionCommand::AdvanceLogStart { offset: 1234 }.encode();
        assert_eq!(
            PartitionCommand::decode_header(&bytes),
            Ok(CommandHeader::AdvanceLogStart { offset: 1234 })
        );
        assert!(PartitionCommand::decode_batch(&bytes).is_err());
        assert!(PartitionCommand::decode_header(&bytes[..5]).is_err());
    }
}
