//! Pieces shared by the two state machines (metadata and partition).

use std::io;

use eddy_raft::Snapshot;
use eddy_raft::SnapshotMeta;
use eddy_raft::kv::KvBatch;
use eddy_raft::kv::KvTree;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Key of the last snapshot a state machine built or installed.
pub const SNAPSHOT_KEY: &[u8] = b"snapshot";

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

pub fn put_snapshot(batch: &mut KvBatch, meta: &SnapshotMeta, data: &[u8]) {
    let stored = StoredSnapshot { meta: meta.clone(), data: data.to_vec() };
    batch.put(SNAPSHOT_KEY, encode(&stored));
}

pub fn load_snapshot(tree: &dyn KvTree) -> io::Result<Option<Snapshot>> {
    let Some(bytes) = tree.get(SNAPSHOT_KEY)? else {
        return Ok(None);
    };
    let s: StoredSnapshot = decode(&bytes, "stored snapshot")?;
    Ok(Some(Snapshot { meta: s.meta, snapshot: s.data }))
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("state always encodes")
}

/// Decodes state read back from the state store; a failure means the store is corrupt.
pub fn decode<T: DeserializeOwned>(b: &[u8], what: &str) -> io::Result<T> {
    postcard::from_bytes(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}")))
}
