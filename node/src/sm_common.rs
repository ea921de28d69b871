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
    let s: StoredSnapshot =
        decode(versioned(&bytes, STORED_SNAPSHOT, "stored snapshot")?.1, "stored snapshot")?;
    Ok(Some(Snapshot { meta: s.meta, snapshot: s.data }))
}

/// A stored format: the tag its records start with from format version 1 on, and the newest
/// version this build reads.
///
/// Format version 0 is untagged: every record written so far, whose postcard encoding starts
/// with an `Option` (byte 0 or 1), never with a tag's first byte. A change to the format
/// writes the tag and version 1 and keeps reading version 0 (see the metadata state for a
/// format on its fifth version). Writers stay on version 0 until then, so that a rolling
/// upgrade's older nodes can read the snapshots the newer ones send.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub tag: &'static [u8; 3],
    pub newest: u8,
}

/// The stored snapshot wrapper ([`put_snapshot`]), both state machines.
pub const STORED_SNAPSHOT: Format = Format { tag: b"EDS", newest: 0 };

/// The format version of a record in `format` and its body, or an error naming the version
/// when the record is in a newer one than this build reads (written by a newer build of Eddy).
pub fn versioned<'a>(b: &'a [u8], format: Format, what: &str) -> io::Result<(u8, &'a [u8])> {
    let Some((head, body)) = b.split_at_checked(format.tag.len() + 1) else {
        return Ok((0, b));
    };
    if head[..format.tag.len()] != format.tag[..] {
        return Ok((0, b));
    }
    match head[format.tag.len()] {
        0 => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what}: a tagged record of version 0"))),
        version if version > format.newest => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what} is in format version {version}, and this build of Eddy reads up to version {}: \
                 run the Eddy version that wrote this data_dir (or a newer one)",
                format.newest
            ),
        )),
        version => Ok((version, body)),
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("state always encodes")
}

/// Decodes state read back from the state store; a failure means the store is corrupt.
pub fn decode<T: DeserializeOwned>(b: &[u8], what: &str) -> io::Result<T> {
    postcard::from_bytes(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Format = Format { tag: b"EDT", newest: 0 };

    #[test]
    fn untagged_records_are_version_0_and_newer_ones_are_refused_by_version() {
        // Every record written so far is untagged: a postcard encoding starting with an Option.
        let v0 = encode(&(Some(7u64), 3u32));
        assert_eq!(versioned(&v0, F, "state").expect("version 0"), (0, &v0[..]));
        assert_eq!(versioned(&[], F, "state").expect("empty"), (0, &[][..]));
        let mut v1 = F.tag.to_vec();
        v1.push(1);
        v1.extend_from_slice(&v0);
        let e = versioned(&v1, F, "the partition state").expect_err("version 1 is newer");
        assert!(e.to_string().contains("the partition state is in format version 1"), "{e}");
        assert!(e.to_string().contains("reads up to version 0"), "{e}");
        let newer = Format { newest: 1, ..F };
        assert_eq!(versioned(&v1, newer, "state").expect("version 1"), (1, &v0[..]));
        v1[3] = 0;
        assert!(versioned(&v1, newer, "state").is_err(), "a tagged record is version 1 or later");
    }
}
