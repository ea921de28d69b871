//! Commands of the metadata group and their replies, as they travel in Raft entries.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

use super::state::TopicRecord;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Create a topic; the state machine chooses the placement.
    CreateTopic {
        name: String,
        partitions: u32,
        replication_factor: u32,
        config: BTreeMap<String, String>,
    },
    AllocateProducerId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    /// For commands without a result, and for blank and membership entries.
    Done,
    TopicCreated(TopicRecord),
    ProducerId(u64),
    Error(MetaError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("topic \"{0}\" already exists")]
    TopicExists(String),
    #[error("replication factor {replication_factor} exceeds the {nodes} nodes available")]
    NotEnoughNodes { replication_factor: u32, nodes: u32 },
    #[error("{0}")]
    Invalid(String),
}

impl MetaCommand {
    pub fn encode(&self) -> Bytes {
        postcard::to_stdvec(self)
            .expect("metadata commands always encode")
            .into()
    }

    pub fn decode(b: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(b)
    }
}

impl MetaReply {
    pub fn encode(&self) -> Bytes {
        postcard::to_stdvec(self)
            .expect("metadata replies always encode")
            .into()
    }

    pub fn decode(b: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(b)
    }
}
