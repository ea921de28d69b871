//! Commands of a partition group and their replies, as they travel in Raft entries.
//!
//! A produce request becomes one [`PartitionCommand::Produce`] entry holding the whole record
//! batch; offsets are not in the entry but assigned when it is applied.

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

/// A command of a partition group, as a proposer builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionCommand {
    Produce(ProduceBatch),
}

/// What applying a produce entry needs, readable without decoding the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceHeader {
    pub producer_id: u64,
    pub base_sequence: u64,
    pub count: u32,
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
    OutOfOrderSequence {
        expected: u64,
        got: u64,
    },
    Invalid(String),
}

/// Why an entry's bytes are not a command this version understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable partition command: {0}")]
pub struct DecodeError(String);

const KIND_PRODUCE: u8 = 1;
/// kind (1) + producer id (8) + base sequence (8) + record count (4).
const PRODUCE_HEADER_BYTES: usize = 21;

impl PartitionCommand {
    /// The entry encoding: a fixed header, then the records (postcard). Every replica applies
    /// every entry, and applying reads only the header.
    pub fn encode(&self) -> Bytes {
        let PartitionCommand::Produce(b) = self;
        let mut out =
            Vec::with_capacity(PRODUCE_HEADER_BYTES + b.records.iter().map(|r| r.size() + 16).sum::<usize>());
        out.push(KIND_PRODUCE);
        out.extend_from_slice(&b.producer_id.to_le_bytes());
        out.extend_from_slice(&b.base_sequence.to_le_bytes());
        out.extend_from_slice(&(b.records.len() as u32).to_le_bytes());
        postcard::to_io(&b.records, &mut out).expect("records always encode");
        out.into()
    }

    /// The header of a produce entry.
    pub fn decode_header(b: &[u8]) -> Result<ProduceHeader, DecodeError> {
        if b.len() < PRODUCE_HEADER_BYTES || b[0] != KIND_PRODUCE {
            return Err(DecodeError(format!("{} bytes, kind {:?}", b.len(), b.first())));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(ProduceHeader {
            producer_id: u64_at(1),
            base_sequence: u64_at(9),
            count: u32::from_le_bytes(b[17..21].try_into().expect("4 bytes")),
        })
    }

    /// The whole batch of a produce entry.
    pub fn decode_batch(b: &[u8]) -> Result<ProduceBatch, DecodeError> {
        let h = Self::decode_header(b)?;
        let records: Vec<StoredRecord> =
            postcard::from_bytes(&b[PRODUCE_HEADER_BYTES..]).map_err(|e| DecodeError(e.to_string()))?;
        if records.len() != h.count as usize {
            return Err(DecodeError(format!("header says {} records, found {}", h.count, records.len())));
        }
        Ok(ProduceBatch { producer_id: h.producer_id, base_sequence: h.base_sequence, records })
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

    #[test]
    fn produce_round_trips_and_the_header_reads_alone() {
        let r = StoredRecord {
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::from_static(b"v"),
            headers: vec![("h".into(), Bytes::new())],
            timestamp_ms: 7,
        };
        let b = ProduceBatch { producer_id: 3, base_sequence: 9, records: vec![r.clone(), r] };
        let bytes = PartitionCommand::Produce(b.clone()).encode();
        assert_eq!(
            PartitionCommand::decode_header(&bytes),
            Ok(ProduceHeader { producer_id: 3, base_sequence: 9, count: 2 })
        );
        assert_eq!(PartitionCommand::decode_batch(&bytes), Ok(b));
        assert!(PartitionCommand::decode_header(&bytes[..10]).is_err());
        assert!(PartitionCommand::decode_batch(&bytes[..bytes.len() - 1]).is_err());
    }
}
