//! The state-store seam: state machines keep their durable state in named trees of a
//! [`StateStore`]. Production uses `sled`; the simulator and tests use [`crate::mem::MemStateStore`],
//! which loses unflushed batches on a simulated crash exactly as sled may.
//!
//! Contract: [`KvTree::apply`] is atomic (after a crash a batch is wholly visible or not at all)
//! and batches become visible in order, but a batch is durable only once a later
//! [`StateStore::flush`] has completed. State machines therefore write their last-applied log id
//! in the same batch as the state it describes, and recover by replaying the Raft log after it.
//!
//! The node opens its store through [`checked::CheckedStore`]: every value carries a checksum,
//! checked on every read and when a tree is opened.

pub mod checked;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::RwLock;

use futures::future::BoxFuture;

pub type KvPair = (Vec<u8>, Vec<u8>);

/// A set of named trees with a common flush.
pub trait StateStore: Send + Sync + 'static {
    /// Opens (creating if needed) the tree called `name`.
    fn tree(&self, name: &str) -> io::Result<Arc<dyn KvTree>>;

    /// Removes a tree and its contents.
    fn drop_tree(&self, name: &str) -> io::Result<()>;

    /// Makes every batch applied so far durable.
    fn flush(&self) -> BoxFuture<'static, io::Result<()>>;
}

/// An ordered map of byte strings.
pub trait KvTree: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>>;

    /// Applies all operations atomically, in order.
    fn apply(&self, batch: KvBatch) -> io::Result<()>;

    /// The entry with the greatest key less than or equal to `key`.
    fn floor(&self, key: &[u8]) -> io::Result<Option<KvPair>>;

    /// Up to `limit` entries with `from <= key < to`, in key order.
    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> io::Result<Vec<KvPair>>;

    /// Whether a large write blocks the calling thread on real I/O or locks (then background
    /// work calls it from a blocking thread, not from an async task). False for in-memory
    /// trees, so the simulator runs everything on its own deterministic runtime.
    fn blocks(&self) -> bool {
        false
    }
}

/// Puts and deletes applied together by [`KvTree::apply`].
#[derive(Debug, Default, Clone)]
pub struct KvBatch {
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl KvBatch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A tree whose writes gather in memory and reach the tree below in one batch when
/// [`BufferedTree::persist`] is called (a state machine calls it every so often, and before a
/// snapshot), instead of one batch per apply: for `sled`, every batch costs log-buffer writes by
/// its I/O threads. Readers through this tree see every write at once.
///
/// The tree below holds a prefix of what was written here, each persist atomic, which is all the
/// state-store contract promised anyway (a batch is durable only after a flush); a state machine
/// that writes its last applied log id with its state recovers by replaying the log after it.
/// A batch that deletes is written through at once, together with everything pending, so the
/// buffer only ever holds puts (and reads merge two sorted sources without tombstones).
pub struct BufferedTree {
    below: Arc<dyn KvTree>,
    buffer: RwLock<Buffer>,
    /// One persist at a time (a snapshot builder, or a persist the state machine started in
    /// the background, may run beside another); `true` once closed.
    persist: std::sync::Mutex<bool>,
}

#[derive(Default)]
struct Buffer {
    /// Writes not yet handed to the tree below.
    pending: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Writes being handed to the tree below by a persist under way (still read from here).
    persisting: Arc<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl BufferedTree {
    pub fn new(below: Arc<dyn KvTree>) -> Self {
        Self { below, buffer: RwLock::default(), persist: std::sync::Mutex::new(false) }
    }

    /// Puts not yet persisted.
    pub fn pending(&self) -> usize {
        self.read().pending.len()
    }

    /// Starts a [`Self::persist`] in the background: on a blocking thread when the tree below
    /// blocks (sled's batch takes its global write lock), so no async worker waits for it; as a
    /// task otherwise (the simulator's in-memory store stays on its deterministic runtime). A
    /// failed persist keeps its writes pending for the next one.
    pub fn persist_in_background(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let tree = self.clone();
        let persist = move || {
            if let Err(e) = tree.persist() {
                tracing::warn!("persisting a state tree failed (retried later): {e}");
            }
        };
        if self.below.blocks() {
            tokio::task::spawn_blocking(persist)
        } else {
            tokio::spawn(async move { persist() })
        }
    }

    /// Hands every pending write to the tree below, in one batch.
    pub fn persist(&self) -> io::Result<()> {
        self.persist_with(KvBatch::default())
    }

    /// Waits for a persist under way, then makes every later persist (and write through) do
    /// nothing: the tree below is about to be dropped, and nothing may write to it after.
    pub fn close(&self) {
        *self.persist.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Hands every pending write and then `then` to the tree below, in one batch.
    fn persist_with(&self, then: KvBatch) -> io::Result<()> {
        let closed = self.persist.lock().unwrap_or_else(|e| e.into_inner());
        if *closed {
            return Ok(());
        }
        let persisting = {
            let mut b = self.write();
            if b.pending.is_empty() && then.is_empty() {
                return Ok(());
            }
            let taken = Arc::new(std::mem::take(&mut b.pending));
            b.persisting = taken.clone();
            taken
        };
        let mut batch = KvBatch { ops: Vec::with_capacity(persisting.len() + then.ops.len()) };
        batch.ops.extend(persisting.iter().map(|(k, v)| (k.clone(), Some(v.clone()))));
        batch.ops.extend(then.ops);
        let result = self.below.apply(batch);
        let mut b = self.write();
        if result.is_err() {
            // Not written below: the writes stay pending (later ones win).
            for (k, v) in persisting.iter() {
                b.pending.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        b.persisting = Arc::default();
        result
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Buffer> {
        self.buffer.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Buffer> {
        self.buffer.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl KvTree for BufferedTree {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        {
            let b = self.read();
            if let Some(v) = b.pending.get(key).or_else(|| b.persisting.get(key)) {
                return Ok(Some(v.clone()));
            }
        }
        self.below.get(key)
    }

    fn apply(&self, batch: KvBatch) -> io::Result<()> {
        if batch.ops.iter().any(|(_, v)| v.is_none()) {
            return self.persist_with(batch);
        }
        let mut b = self.write();
        for (k, v) in batch.ops {
            b.pending.insert(k, v.expect("only puts are buffered"));
        }
        Ok(())
    }

    fn floor(&self, key: &[u8]) -> io::Result<Option<KvPair>> {
        let buffered = {
            let b = self.read();
            let upto = (std::ops::Bound::Unbounded, std::ops::Bound::Included(key));
            let p = b.pending.range::<[u8], _>(upto).next_back();
            let q = b.persisting.range::<[u8], _>(upto).next_back();
            match (p, q) {
                (Some(p), Some(q)) => Some(if q.0 > p.0 { q } else { p }),
                (p, q) => p.or(q),
            }
            .map(|(k, v)| (k.clone(), v.clone()))
        };
        let below = self.below.floor(key)?;
        Ok(match (buffered, below) {
            (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
            (a, b) => a.or(b),
        })
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> io::Result<Vec<KvPair>> {
        if from >= to {
            return Ok(Vec::new());
        }
        // The buffer's entries of the range overlay the tree below's (newer wins on equal keys).
        // The buffer is read first: a persist that completes in between moves entries below,
        // where the second read finds them (the other order could miss them).
        let mut buffered: Vec<KvPair> = Vec::new();
        {
            let b = self.read();
            let range = (std::ops::Bound::Included(from), std::ops::Bound::Excluded(to));
            for (k, v) in b.persisting.range::<[u8], _>(range).take(limit) {
                buffered.push((k.clone(), v.clone()));
            }
            for (k, v) in b.pending.range::<[u8], _>(range).take(limit) {
                buffered.push((k.clone(), v.clone()));
            }
        }
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self.below.scan(from, to, limit)?.into_iter().collect();
        merged.extend(buffered);
        Ok(merged.into_iter().take(limit).collect())
    }
}

/// `sled`, the production state store. It is kept off the hot path's durability: the Raft log
/// is what makes an event durable; sled holds state that can be rebuilt by replaying that log.
pub struct SledStateStore {
    db: sled::Db,
}

impl SledStateStore {
    pub fn open(path: &Path) -> io::Result<Self> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            // Durability comes from explicit flushes at the points the state machines need it.
            .flush_every_ms(Some(1000))
            .open()
            .map_err(sled_err)?;
        Ok(Self { db })
    }
}

impl StateStore for SledStateStore {
    fn tree(&self, name: &str) -> io::Result<Arc<dyn KvTree>> {
        let tree = self.db.open_tree(name).map_err(sled_err)?;
        Ok(Arc::new(SledTree { tree }))
    }

    fn drop_tree(&self, name: &str) -> io::Result<()> {
        self.db.drop_tree(name).map_err(sled_err)?;
        Ok(())
    }

    fn flush(&self) -> BoxFuture<'static, io::Result<()>> {
        // Not `flush_async`: it can deadlock under concurrent callers (sled #1308).
        let db = self.db.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || db.flush()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(sled_err(e)),
                Err(e) => Err(io::Error::other(format!("sled flush task failed: {e}"))),
            }
        })
    }
}

struct SledTree {
    tree: sled::Tree,
}

impl KvTree for SledTree {
    /// sled's batches take its global write lock, and flush its I/O buffer before and after.
    fn blocks(&self) -> bool {
        true
    }

    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
    }

    fn apply(&self, batch: KvBatch) -> io::Result<()> {
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.tree.apply_batch(b).map_err(sled_err)
    }

    fn floor(&self, key: &[u8]) -> io::Result<Option<KvPair>> {
        match self.tree.range(..=key).next_back() {
            None => Ok(None),
            Some(r) => {
                let (k, v) = r.map_err(sled_err)?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
        }
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> io::Result<Vec<KvPair>> {
        let mut out = Vec::new();
        for r in self.tree.range(from..to).take(limit) {
            let (k, v) = r.map_err(sled_err)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

fn sled_err(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        other => io::Error::other(format!("sled: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemStateStore;

    fn check(store: &dyn StateStore) -> io::Result<()> {
        let t = store.tree("t")?;
        let mut b = KvBatch::default();
        b.put(*b"a", *b"1");
        b.put(*b"c", *b"3");
        b.put(*b"e", *b"5");
        t.apply(b)?;
        assert_eq!(t.get(b"c")?, Some(b"3".to_vec()));
        assert_eq!(t.get(b"b")?, None);
        assert_eq!(t.floor(b"d")?.map(|p| p.0), Some(b"c".to_vec()));
        assert_eq!(t.floor(b"c")?.map(|p| p.0), Some(b"c".to_vec()));
        assert_eq!(t.floor(b"0")?, None);
        let keys: Vec<_> = t.scan(b"b", b"z", 10)?.into_iter().map(|p| p.0).collect();
        assert_eq!(keys, vec![b"c".to_vec(), b"e".to_vec()]);
        assert_eq!(t.scan(b"a", b"z", 1)?.len(), 1);
        let mut b = KvBatch::default();
        b.delete(*b"c");
        t.apply(b)?;
        assert_eq!(t.get(b"c")?, None);
        store.drop_tree("t")?;
        assert_eq!(store.tree("t")?.get(b"a")?, None);
        Ok(())
    }

    #[test]
    fn sled_store_behaves() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        check(&SledStateStore::open(dir.path())?)
    }

    #[test]
    fn checked_sled_store_behaves() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        check(&checked::CheckedStore::new(Arc::new(SledStateStore::open(dir.path())?)))
    }

    #[test]
    fn mem_store_behaves() -> io::Result<()> {
        check(&MemStateStore::default())
    }

    /// A store whose trees are buffered, for `check`.
    struct Buffered(MemStateStore);

    impl StateStore for Buffered {
        fn tree(&self, name: &str) -> io::Result<Arc<dyn KvTree>> {
            Ok(Arc::new(BufferedTree::new(self.0.tree(name)?)))
        }
        fn drop_tree(&self, name: &str) -> io::Result<()> {
            self.0.drop_tree(name)
        }
        fn flush(&self) -> BoxFuture<'static, io::Result<()>> {
            self.0.flush()
        }
    }

    #[test]
    fn buffered_tree_behaves() -> io::Result<()> {
        check(&Buffered(MemStateStore::default()))
    }

    proptest::proptest! {
        /// Whatever was written, persisted or not, a buffered tree reads like a plain tree that
        /// got the same batches, and after a persist the tree below reads the same.
        #[test]
        fn buffered_tree_reads_like_a_plain_tree(
            ops in proptest::collection::vec((0u8..4, 0u8..24, 0u8..8), 1..120),
        ) {
            let plain = MemStateStore::default().tree("t")?;
            let below = MemStateStore::default().tree("t")?;
            let t = BufferedTree::new(below.clone());
            let key = |k: u8| vec![b'k', k / 3, k];
            for (kind, k, v) in ops {
                let mut b = KvBatch::default();
                match kind {
                    0 => b.delete(key(k)),
                    1 => t.persist()?,
                    _ => {
                        b.put(key(k), vec![v]);
                        b.put(key(k.wrapping_add(5) % 24), vec![v, v]);
                    }
                }
                if !b.is_empty() {
                    plain.apply(b.clone())?;
                    t.apply(b)?;
                }
                for probe in 0..24u8 {
                    proptest::prop_assert_eq!(t.get(&key(probe))?, plain.get(&key(probe))?);
                    proptest::prop_assert_eq!(t.floor(&key(probe))?, plain.floor(&key(probe))?);
                    for limit in [1, 3, 100] {
                        proptest::prop_assert_eq!(
                            t.scan(&key(probe), &key(probe.saturating_add(9)), limit)?,
                            plain.scan(&key(probe), &key(probe.saturating_add(9)), limit)?
                        );
                    }
                }
            }
            t.persist()?;
            proptest::prop_assert_eq!(t.pending(), 0);
            proptest::prop_assert_eq!(below.scan(b"", b"z", 1000)?, plain.scan(b"", b"z", 1000)?);
        }
    }
}
