//! Checksummed state: [`CheckedStore`] wraps a [`StateStore`] so that every value carries a
//! CRC32C of its key and value, checked on every read, and every tree is checked whole when it
//! is opened. A corrupted byte is then an error naming the tree and the key, never state read
//! back as if it were good: a flipped bit in an offset-index entry still decodes (its fields are
//! fixed-size integers), and would send readers to the wrong records.
//!
//! Format (per tree, recorded under [`FORMAT_KEY`], which sorts after every key Eddy uses):
//! - version 0: no format record; values are stored as given (every tree written before this
//!   format existed, such as `tests/fixtures/data-v1`);
//! - version 1: each value is `crc32c(key ‖ value)` (4 bytes, little-endian) followed by the
//!   value, and the format record is `EKV`, the version, a state byte (0: complete; 1: a
//!   conversion from version 0 under way, followed by the last key converted) and a CRC32C of
//!   those bytes.
//!
//! Opening a version-0 tree converts it in batches of [`OPEN_CHUNK`] entries, each batch also
//! recording how far the conversion got, so a crash part-way leaves a tree the next open
//! finishes (the state-store contract: batches are atomic and survive a crash in order). A tree
//! never goes back to version 0: an older build of Eddy cannot open it (see the README's
//! upgrade procedure).

use std::io;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::KvBatch;
use super::KvPair;
use super::KvTree;
use super::StateStore;

/// The key of a tree's format record. Every key a state machine writes must sort below it
/// (Eddy's keys start with a lowercase letter); [`KvTree::apply`] refuses any other.
pub const FORMAT_KEY: &[u8] = b"\xff\xffeddy.state-format";
const FORMAT_TAG: &[u8; 3] = b"EKV";
/// The newest format version this build writes and reads.
pub const NEWEST: u8 = 1;
/// Entries converted or checked per batch when a tree is opened.
const OPEN_CHUNK: usize = 4096;
const CRC_LEN: usize = 4;

/// A [`StateStore`] whose trees check every value (see the module's documentation).
pub struct CheckedStore {
    inner: Arc<dyn StateStore>,
    verify: bool,
}

impl CheckedStore {
    pub fn new(inner: Arc<dyn StateStore>) -> Self {
        Self { inner, verify: true }
    }

    /// Planted bug `state-corrupt-served` (simulator only): values are stored with their
    /// checksums, but nothing is checked, so a corrupted byte is read back as state.
    #[cfg(feature = "planted-bugs")]
    pub fn unchecked(inner: Arc<dyn StateStore>) -> Self {
        Self { inner, verify: false }
    }
}

impl StateStore for CheckedStore {
    fn tree(&self, name: &str) -> io::Result<Arc<dyn KvTree>> {
        let tree = CheckedTree { below: self.inner.tree(name)?, name: name.to_owned(), verify: self.verify };
        tree.open()?;
        Ok(Arc::new(tree))
    }

    fn drop_tree(&self, name: &str) -> io::Result<()> {
        self.inner.drop_tree(name)
    }

    fn flush(&self) -> BoxFuture<'static, io::Result<()>> {
        self.inner.flush()
    }
}

struct CheckedTree {
    below: Arc<dyn KvTree>,
    name: String,
    verify: bool,
}

/// Where a tree's conversion to version 1 stands.
#[derive(Debug, PartialEq, Eq)]
enum Format {
    /// Version 1, every value sealed.
    Complete,
    /// Converting from version 0: the entries up to this key (inclusive) are sealed.
    Converting(Vec<u8>),
}

fn crc(key: &[u8], value: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(key), value)
}

fn seal(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(CRC_LEN + value.len());
    v.extend_from_slice(&crc(key, value).to_le_bytes());
    v.extend_from_slice(value);
    v
}

fn encode_format(f: &Format) -> Vec<u8> {
    let mut v = FORMAT_TAG.to_vec();
    v.push(NEWEST);
    match f {
        Format::Complete => v.push(0),
        Format::Converting(last) => {
            v.push(1);
            v.extend_from_slice(last);
        }
    }
    let sum = crc32c::crc32c(&v);
    v.extend_from_slice(&sum.to_le_bytes());
    v
}

impl CheckedTree {
    fn corrupt(&self, what: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the state store is corrupt: tree {}: {what}", self.name),
        )
    }

    /// A stored value's contents, once its checksum matched.
    fn unseal(&self, key: &[u8], mut stored: Vec<u8>) -> io::Result<Vec<u8>> {
        if stored.len() < CRC_LEN {
            return Err(self.corrupt(format!(
                "the value of key {key:02x?} has {} bytes, too few for its checksum",
                stored.len()
            )));
        }
        let sum = u32::from_le_bytes(stored[..CRC_LEN].try_into().expect("4 bytes"));
        // In place: no second allocation on the read path (offset-index reads serve fetches).
        stored.drain(..CRC_LEN);
        if self.verify && sum != crc(key, &stored) {
            return Err(self.corrupt(format!(
                "the value of key {key:02x?} ({} bytes) fails its checksum",
                stored.len()
            )));
        }
        Ok(stored)
    }

    fn read_format(&self) -> io::Result<Option<Format>> {
        let Some(v) = self.below.get(FORMAT_KEY)? else { return Ok(None) };
        let bad = || self.corrupt(format!("its format record ({} bytes) is damaged", v.len()));
        if v.len() < FORMAT_TAG.len() + 2 + CRC_LEN || &v[..FORMAT_TAG.len()] != FORMAT_TAG {
            return Err(bad());
        }
        let (body, sum) = v.split_at(v.len() - CRC_LEN);
        if u32::from_le_bytes(sum.try_into().expect("4 bytes")) != crc32c::crc32c(body) {
            return Err(bad());
        }
        let version = body[FORMAT_TAG.len()];
        if version > NEWEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "state tree {} is in format version {version}, and this build of Eddy reads up to \
                     version {NEWEST}: run the Eddy version that wrote this data_dir (or a newer one)",
                    self.name
                ),
            ));
        }
        match (body[FORMAT_TAG.len() + 1], &body[FORMAT_TAG.len() + 2..]) {
            (0, []) => Ok(Some(Format::Complete)),
            (1, last) => Ok(Some(Format::Converting(last.to_vec()))),
            _ => Err(bad()),
        }
    }

    /// Converts a version-0 tree (or finishes a conversion a crash interrupted), then checks
    /// every entry.
    fn open(&self) -> io::Result<()> {
        let mut from = match self.read_format()? {
            Some(Format::Complete) => None,
            None => Some(Vec::new()),
            Some(Format::Converting(last)) => Some(after(&last)),
        };
        while let Some(start) = from.take() {
            let chunk = self.below.scan(&start, FORMAT_KEY, OPEN_CHUNK)?;
            let mut batch = KvBatch::default();
            let state = match chunk.last() {
                Some((last, _)) if chunk.len() == OPEN_CHUNK => {
                    from = Some(after(last));
                    Format::Converting(last.clone())
                }
                _ => Format::Complete,
            };
            for (k, v) in chunk {
                let sealed = seal(&k, &v);
                batch.put(k, sealed);
            }
            batch.put(FORMAT_KEY, encode_format(&state));
            self.below.apply(batch)?;
        }
        if !self.verify {
            return Ok(());
        }
        let mut start = Vec::new();
        loop {
            let chunk = self.below.scan(&start, FORMAT_KEY, OPEN_CHUNK)?;
            let full = chunk.len() == OPEN_CHUNK;
            let mut last = None;
            for (k, v) in chunk {
                self.unseal(&k, v)?;
                last = Some(k);
            }
            match last {
                Some(k) if full => start = after(&k),
                _ => return Ok(()),
            }
        }
    }

    fn check_key(&self, key: &[u8]) -> io::Result<()> {
        if key >= FORMAT_KEY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "state tree {}: key {key:02x?} sorts at or after the tree's format record",
                    self.name
                ),
            ));
        }
        Ok(())
    }
}

/// The smallest key after `key`.
fn after(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

impl KvTree for CheckedTree {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        self.check_key(key)?;
        match self.below.get(key)? {
            Some(v) => self.unseal(key, v).map(Some),
            None => Ok(None),
        }
    }

    fn apply(&self, batch: KvBatch) -> io::Result<()> {
        let mut sealed = KvBatch { ops: Vec::with_capacity(batch.ops.len()) };
        for (k, v) in batch.ops {
            self.check_key(&k)?;
            let v = v.map(|v| seal(&k, &v));
            sealed.ops.push((k, v));
        }
        self.below.apply(sealed)
    }

    fn floor(&self, key: &[u8]) -> io::Result<Option<KvPair>> {
        self.check_key(key)?;
        match self.below.floor(key)? {
            Some((k, v)) => {
                let v = self.unseal(&k, v)?;
                Ok(Some((k, v)))
            }
            None => Ok(None),
        }
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> io::Result<Vec<KvPair>> {
        let to = to.min(FORMAT_KEY);
        self.below
            .scan(from, to, limit)?
            .into_iter()
            .map(|(k, v)| {
                let v = self.unseal(&k, v)?;
                Ok((k, v))
            })
            .collect()
    }

    fn blocks(&self) -> bool {
        self.below.blocks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemStateStore;

    fn put(tree: &dyn KvTree, k: &[u8], v: &[u8]) -> io::Result<()> {
        let mut b = KvBatch::default();
        b.put(k, v);
        tree.apply(b)
    }

    #[test]
    fn values_round_trip_and_the_raw_tree_holds_them_sealed() -> io::Result<()> {
        let raw = MemStateStore::default();
        let store = CheckedStore::new(Arc::new(raw.clone()));
        let t = store.tree("g1")?;
        put(&*t, b"a", b"one")?;
        put(&*t, b"c", b"three")?;
        assert_eq!(t.get(b"a")?, Some(b"one".to_vec()));
        assert_eq!(t.floor(b"b")?, Some((b"a".to_vec(), b"one".to_vec())));
        assert_eq!(t.scan(b"", b"\xff\xff\xff", 10)?.len(), 2, "the format record is never listed");
        let below = raw.tree("g1")?;
        assert_eq!(below.get(b"a")?, Some(seal(b"a", b"one")));
        assert_eq!(below.get(FORMAT_KEY)?, Some(encode_format(&Format::Complete)));
        let e = put(&*t, FORMAT_KEY, b"x").expect_err("the format record's key is reserved");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        Ok(())
    }

    /// Every byte of every stored value, flipped, makes the open fail naming the tree and key,
    /// and a read of that key fail too (a tree opened before the damage).
    #[test]
    fn a_flipped_byte_anywhere_is_refused_at_open_and_on_read() -> io::Result<()> {
        let raw = MemStateStore::default();
        let store = CheckedStore::new(Arc::new(raw.clone()));
        let t = store.tree("g7")?;
        put(&*t, b"m", b"meta")?;
        put(&*t, b"o\0\0\0\0\0\0\0\x05", &[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 1])?;
        put(&*t, b"p", b"")?;
        for key in [&b"m"[..], b"o\0\0\0\0\0\0\0\x05", b"p"] {
            let len = raw.tree("g7")?.get(key)?.expect("stored").len();
            for at in 0..len {
                for xor in [1u8, 0x80, 0xff] {
                    assert!(raw.corrupt("g7", key, at, xor));
                    let e = store.tree("g7").err().expect("the open refuses a corrupt tree");
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    assert!(
                        e.to_string().contains("tree g7") && e.to_string().contains(&format!("{key:02x?}")),
                        "{e}"
                    );
                    let e = t.get(key).expect_err("a read refuses a corrupt value");
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    assert!(raw.corrupt("g7", key, at, xor), "undone");
                }
            }
        }
        store.tree("g7")?;
        for (at, xor) in [(0, 1), (4, 2), (5, 1)] {
            assert!(raw.corrupt("g7", FORMAT_KEY, at, xor));
            let e = store.tree("g7").err().expect("a damaged format record is refused");
            assert!(e.to_string().contains("format record"), "{e}");
            assert!(raw.corrupt("g7", FORMAT_KEY, at, xor), "undone");
        }
        Ok(())
    }

    /// A tree written unchecked (version 0) is converted at open, and a conversion a crash
    /// interrupted after any batch is finished by the next open, never sealing a value twice.
    #[test]
    fn version_0_trees_are_converted_even_across_a_crash() -> io::Result<()> {
        for crash_after in [0, 1, 2, 3] {
            let raw = MemStateStore::default();
            let plain = raw.tree("meta")?;
            let n = OPEN_CHUNK * 2 + 7;
            let key = |i: usize| format!("k{i:06}").into_bytes();
            let mut b = KvBatch::default();
            for i in 0..n {
                b.put(key(i), i.to_be_bytes());
            }
            plain.apply(b)?;
            futures::executor::block_on(raw.flush())?;
            // The first open converts in three batches; keep `crash_after` of them.
            let store = CheckedStore::new(Arc::new(raw.clone()));
            let t = store.tree("meta")?;
            assert_eq!(t.get(&key(n - 1))?, Some((n - 1).to_be_bytes().to_vec()));
            raw.keep_pending(crash_after);
            futures::executor::block_on(raw.flush())?;
            raw.crash();
            let t = store.tree("meta")?;
            for i in [0, OPEN_CHUNK - 1, OPEN_CHUNK, 2 * OPEN_CHUNK, n - 1] {
                assert_eq!(
                    t.get(&key(i))?,
                    Some(i.to_be_bytes().to_vec()),
                    "crash after {crash_after}, key {i}"
                );
            }
            assert_eq!(raw.tree("meta")?.get(FORMAT_KEY)?, Some(encode_format(&Format::Complete)));
        }
        Ok(())
    }

    #[test]
    fn a_newer_format_is_refused_by_version() -> io::Result<()> {
        let raw = MemStateStore::default();
        let mut rec = FORMAT_TAG.to_vec();
        rec.extend_from_slice(&[NEWEST + 1, 0]);
        let sum = crc32c::crc32c(&rec);
        rec.extend_from_slice(&sum.to_le_bytes());
        put(&*raw.tree("node")?, FORMAT_KEY, &rec)?;
        let e = CheckedStore::new(Arc::new(raw)).tree("node").err().expect("newer");
        assert!(e.to_string().contains(&format!("format version {}", NEWEST + 1)), "{e}");
        Ok(())
    }
}
