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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionCommand {
    Produce(ProduceBatch),
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

impl PartitionCommand {
    pub fn encode(&self) -> Bytes {
        postcard::to_stdvec(self)
            .expect("partition commands always encode")
            .into()
    }

    pub fn decode(b: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(b)
    }
}

impl PartitionReply {
    pub fn encode(&self) -> Bytes {
        postcard::to_stdvec(self)
            .expect("partition replies always encode")
            .into()
    }

    pub fn decode(b: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(b)
    }
}
