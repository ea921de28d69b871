//! The state-store seam: state machines keep their durable state in named trees of a
//! [`StateStore`]. Production uses `sled`; the simulator and tests use [`crate::mem::MemStateStore`],
//! which loses unflushed batches on a simulated crash exactly as sled may.
//!
//! Contract: [`KvTree::apply`] is atomic (after a crash a batch is wholly visible or not at all)
//! and batches become visible in order, but a batch is durable only once a later
//! [`StateStore::flush`] has completed. State machines therefore write their last-applied log id
//! in the same batch as the state it describes, and recover by replaying the Raft log after it.

use std::io;
use std::path::Path;
use std::sync::Arc;

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
    fn mem_store_behaves() -> io::Result<()> {
        check(&MemStateStore::default())
    }
}
