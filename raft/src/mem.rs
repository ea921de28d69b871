//! In-memory implementations of the storage seams with crash semantics: [`MemDisk`] (a [`Vfs`])
//! and [`MemStateStore`] (a [`StateStore`]).
//!
//! Both keep two views of their contents: what a running process sees, and what would survive a
//! power loss. `crash` throws the first away. The simulator gives every host one of each; tests
//! use them to check recovery without a real crash.
//!
//! Model of [`MemDisk`]:
//! - a write changes the file's contents at once; `sync_data` makes the contents as of the call
//!   durable (`fdatasync` also persists the file's size);
//! - creating or removing a file changes the directory; `sync_dir` makes it durable;
//! - on `crash`, each file reverts to its durable contents, files created since the last
//!   `sync_dir` disappear and files removed since then come back; optionally the unsynced tail
//!   of a file survives in part (a torn write).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::kv::KvBatch;
use crate::kv::KvPair;
use crate::kv::KvTree;
use crate::kv::StateStore;
use crate::vfs::VFile;
use crate::vfs::Vfs;

type Inode = u64;

#[derive(Default)]
struct Inodes {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Changes not yet durable, oldest first; the first has sequence number `synced`.
    pending: std::collections::VecDeque<Change>,
    /// How many changes have been made durable (or dropped by a lying sync).
    synced: u64,
}

/// A change to a file's contents, kept until a sync makes it durable. Syncing replays changes
/// instead of copying the file, so a sync costs what was written since the last one.
enum Change {
    Write(usize, Vec<u8>),
    SetLen(usize),
}

impl Change {
    fn apply(&self, data: &mut Vec<u8>) {
        match self {
            Change::Write(start, bytes) => {
                let end = start + bytes.len();
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[*start..end].copy_from_slice(bytes);
            }
            Change::SetLen(len) => data.resize(*len, 0),
        }
    }
}

#[derive(Default)]
struct DiskState {
    next_inode: Inode,
    inodes: BTreeMap<Inode, Inodes>,
    /// Directory entries as the running process sees them.
    names: BTreeMap<PathBuf, Inode>,
    /// Directory entries that would survive a crash.
    durable_names: BTreeMap<PathBuf, Inode>,
    dirs: BTreeSet<PathBuf>,
    /// When set, `sync_data` reports success without making anything durable: the planted bug
    /// `ack-before-fsync` of the simulator.
    fsync_lies: bool,
    sync_latency: Duration,
    /// The disk's size: a write that would grow the files past it fails with `StorageFull`
    /// (the simulator's `disk-full` fault). `None`: unbounded.
    capacity: Option<u64>,
    space_low: bool,
    /// When set, `sync_data` and `sync_dir` fail with `EIO` (the simulator's `fsync-fail`
    /// fault), and, as Linux does, the writes they were to make durable are dropped from the
    /// dirty set without being made durable: a later sync that succeeds does not persist them.
    fsync_fails: bool,
}

/// A simulated disk. Cloning shares the disk.
#[derive(Clone, Default)]
pub struct MemDisk {
    state: Arc<Mutex<DiskState>>,
}

impl MemDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `sync_data` and `sync_dir` take this long (on the tokio clock).
    pub fn set_sync_latency(&self, latency: Duration) {
        self.lock().sync_latency = latency;
    }

    /// Bounds the disk to `capacity` bytes (`None`: unbounded). Shrinking it below what is
    /// stored fails every write that grows a file until space is freed or the bound raised.
    pub fn set_capacity(&self, capacity: Option<u64>) {
        self.lock().capacity = capacity;
    }

    /// Makes `sync_data` and `sync_dir` fail (see `DiskState::fsync_fails`) until cleared.
    pub fn set_fsync_fails(&self, fails: bool) {
        self.lock().fsync_fails = fails;
    }

    /// Whether syncs fail (see [`MemDisk::set_fsync_fails`]).
    pub fn fsync_fails(&self) -> bool {
        self.lock().fsync_fails
    }

    /// Makes `sync_data` lie: it succeeds without persisting anything.
    pub fn set_fsync_lies(&self, lies: bool) {
        self.lock().fsync_lies = lies;
    }

    /// Loses everything not made durable. With `tear`, a file whose unsynced contents extend its
    /// durable contents keeps a prefix of that extension: `tear(unsynced_len)` picks its length.
    pub fn crash(&self, mut tear: Option<&mut dyn FnMut(usize) -> usize>) {
        let mut st = self.lock();
        let st = &mut *st;
        st.names = st.durable_names.clone();
        let live: BTreeSet<Inode> = st.names.values().copied().collect();
        st.inodes.retain(|ino, _| live.contains(ino));
        for f in st.inodes.values_mut() {
            let mut survived = f.durable.clone();
            if let Some(tear) = tear.as_deref_mut()
                && f.current.len() > f.durable.len()
                && f.current.starts_with(&f.durable)
            {
                let extra = &f.current[f.durable.len()..];
                let keep = tear(extra.len()).min(extra.len());
                survived.extend_from_slice(&extra[..keep]);
            }
            f.current = survived.clone();
            f.durable = survived;
            f.synced += f.pending.len() as u64;
            f.pending.clear();
        }
    }

    /// Puts a durable file on the disk, as an operator places one before the node starts (the
    /// simulator's certificates).
    pub fn install(&self, path: &Path, bytes: &[u8]) {
        let mut st = self.lock();
        for a in path.ancestors().skip(1) {
            st.dirs.insert(a.to_owned());
        }
        st.next_inode += 1;
        let ino = st.next_inode;
        st.inodes
            .insert(ino, Inodes { current: bytes.to_vec(), durable: bytes.to_vec(), ..Default::default() });
        st.names.insert(path.to_owned(), ino);
        st.durable_names.insert(path.to_owned(), ino);
    }

    /// What of file `path` would survive a power loss (`None`: no such file).
    pub fn durable_contents(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.lock();
        let ino = st.names.get(path)?;
        Some(st.inodes.get(ino)?.durable.clone())
    }

    /// Damages the disk under byte `offset` of file `path`: the byte is XORed with `xor` in what
    /// the process reads and in what survives a power loss (the simulator's `disk-corrupt`
    /// fault). Returns whether the file holds that byte.
    pub fn corrupt(&self, path: &Path, offset: usize, xor: u8) -> bool {
        let mut st = self.lock();
        let Some(ino) = st.names.get(path).copied() else { return false };
        let Some(f) = st.inodes.get_mut(&ino) else { return false };
        let mut hit = false;
        for data in [&mut f.current, &mut f.durable] {
            if let Some(b) = data.get_mut(offset) {
                *b ^= xor;
                hit = true;
            }
        }
        hit
    }

    /// Total bytes a running process sees, for reports.
    pub fn bytes(&self) -> usize {
        self.lock().inodes.values().map(|f| f.current.len()).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.state.lock().expect("MemDisk lock poisoned")
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display()))
}

impl Vfs for MemDisk {
    fn available_bytes(&self, _path: &Path) -> io::Result<u64> {
        let st = self.lock();
        let used: u64 = st.inodes.values().map(|f| f.current.len() as u64).sum();
        Ok(st.capacity.map_or(u64::MAX, |c| c.saturating_sub(used)))
    }

    fn set_space_low(&self, low: bool) {
        self.lock().space_low = low;
    }

    fn space_low(&self) -> bool {
        self.lock().space_low
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        for a in path.ancestors() {
            st.dirs.insert(a.to_owned());
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        if !st.dirs.contains(path) {
            return Err(not_found(path));
        }
        let mut out: BTreeSet<String> = BTreeSet::new();
        for p in st.names.keys().chain(st.dirs.iter()) {
            if p.parent() == Some(path)
                && let Some(name) = p.file_name()
            {
                out.insert(name.to_string_lossy().into_owned());
            }
        }
        Ok(out.into_iter().collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let st = self.lock();
        st.names.contains_key(path) || st.dirs.contains(path)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VFile>> {
        let mut st = self.lock();
        let ino = match st.names.get(path) {
            Some(ino) => *ino,
            None if create => {
                if let Some(parent) = path.parent()
                    && !st.dirs.contains(parent)
                {
                    return Err(not_found(parent));
                }
                st.next_inode += 1;
                let ino = st.next_inode;
                st.inodes.insert(ino, Inodes::default());
                st.names.insert(path.to_owned(), ino);
                ino
            }
            None => return Err(not_found(path)),
        };
        Ok(Arc::new(MemFile { disk: self.clone(), ino }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.names.remove(path).map(|_| ()).ok_or_else(|| not_found(path))
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.names.retain(|p, _| !p.starts_with(path));
        st.dirs.retain(|p| !p.starts_with(path));
        Ok(())
    }

    fn read_small(&self, path: &Path, max: u64) -> io::Result<Vec<u8>> {
        let st = self.lock();
        let ino = st.names.get(path).ok_or_else(|| not_found(path))?;
        let data = st.inodes.get(ino).map(|f| f.current.clone()).unwrap_or_default();
        crate::vfs::too_big(path, data.len() as u64, max)?;
        Ok(data)
    }

    fn sync_dir(&self, path: &Path) -> BoxFuture<'static, io::Result<()>> {
        let disk = self.clone();
        let path = path.to_owned();
        let latency = self.lock().sync_latency;
        Box::pin(async move {
            // What the directory holds when the call starts is what becomes durable.
            let entries: Vec<(PathBuf, Inode)> = {
                let st = disk.lock();
                st.names
                    .iter()
                    .filter(|(p, _)| p.parent() == Some(&path))
                    .map(|(p, i)| (p.clone(), *i))
                    .collect()
            };
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let mut st = disk.lock();
            if st.fsync_fails {
                return Err(fsync_error());
            }
            st.durable_names.retain(|p, _| p.parent() != Some(&path));
            st.durable_names.extend(entries);
            Ok(())
        })
    }
}

struct MemFile {
    disk: MemDisk,
    ino: Inode,
}

impl MemFile {
    fn with<T>(&self, f: impl FnOnce(&mut Inodes) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.disk.lock();
        match st.inodes.get_mut(&self.ino) {
            Some(file) => f(file),
            // The host crashed and this handle's file did not survive.
            None => Err(io::Error::new(io::ErrorKind::NotFound, "file lost in a crash")),
        }
    }
}

impl VFile for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|f| {
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let end = start.checked_add(buf.len()).ok_or_else(|| io::Error::other("offset overflow"))?;
            if end > f.current.len() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file"));
            }
            buf.copy_from_slice(&f.current[start..end]);
            Ok(())
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let st = self.disk.lock();
        if let Some(capacity) = st.capacity {
            let used: u64 = st.inodes.values().map(|f| f.current.len() as u64).sum();
            let len = st.inodes.get(&self.ino).map_or(0, |f| f.current.len() as u64);
            let grows = (offset + buf.len() as u64).saturating_sub(len);
            if used + grows > capacity {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("no space left on device: {used} of {capacity} bytes used"),
                ));
            }
        }
        drop(st);
        self.with(|f| {
            let change = Change::Write(usize::try_from(offset).map_err(io::Error::other)?, buf.to_vec());
            change.apply(&mut f.current);
            f.pending.push_back(change);
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|f| Ok(f.current.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|f| {
            let change = Change::SetLen(usize::try_from(len).map_err(io::Error::other)?);
            change.apply(&mut f.current);
            f.pending.push_back(change);
            Ok(())
        })
    }

    fn sync_data(&self) -> BoxFuture<'static, io::Result<()>> {
        let disk = self.disk.clone();
        let ino = self.ino;
        // What was written before the call is what the sync makes durable.
        let (upto, latency, lies) = {
            let st = disk.lock();
            (st.inodes.get(&ino).map(|f| f.synced + f.pending.len() as u64), st.sync_latency, st.fsync_lies)
        };
        Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let mut st = disk.lock();
            let fails = st.fsync_fails;
            match (st.inodes.get_mut(&ino), upto) {
                (Some(f), Some(upto)) => {
                    while f.synced < upto {
                        let Some(change) = f.pending.pop_front() else {
                            break;
                        };
                        if !lies && !fails {
                            change.apply(&mut f.durable);
                        }
                        f.synced += 1;
                    }
                    // A lying or failing sync drops the changes without making them durable:
                    // a crash then reverts the file to what a good sync last persisted.
                    if fails { Err(fsync_error()) } else { Ok(()) }
                }
                _ => Err(io::Error::new(io::ErrorKind::NotFound, "file lost in a crash")),
            }
        })
    }
}

fn fsync_error() -> io::Error {
    io::Error::other("Input/output error (os error 5): the simulated disk failed a sync")
}

#[derive(Default)]
struct StoreState {
    current: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    durable: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Batches (and tree drops, as `None`) applied since the last flush, in order.
    pending: Vec<(String, Option<KvBatch>)>,
}

/// An in-memory [`StateStore`] that loses unflushed batches on `crash`, as sled may.
#[derive(Clone, Default)]
pub struct MemStateStore {
    state: Arc<Mutex<StoreState>>,
}

impl MemStateStore {
    pub fn crash(&self) {
        let mut st = self.lock();
        st.current = st.durable.clone();
        st.pending.clear();
    }

    /// Flips a byte of the value stored under `key` in tree `name` (`value[offset] ^= xor`),
    /// as read now and as made durable: damage on the disk below the store. False when there is
    /// no such byte.
    pub fn corrupt(&self, name: &str, key: &[u8], offset: usize, xor: u8) -> bool {
        let mut st = self.lock();
        let mut hit = false;
        let StoreState { current, durable, .. } = &mut *st;
        for trees in [current, durable] {
            if let Some(b) = trees.get_mut(name).and_then(|t| t.get_mut(key)).and_then(|v| v.get_mut(offset))
            {
                *b ^= xor;
                hit = true;
            }
        }
        hit
    }

    /// The durable entries of tree `name` whose values read the same now (no write since the
    /// last flush changed them), in key order.
    pub fn durable_entries(&self, name: &str) -> Vec<KvPair> {
        let st = self.lock();
        let Some(durable) = st.durable.get(name) else { return Vec::new() };
        let current = st.current.get(name);
        durable
            .iter()
            .filter(|(k, v)| current.and_then(|c| c.get(*k)) == Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Keeps only the first `n` batches applied since the last flush, as a crash that lost
    /// the rest would (call [`Self::crash`] after a flush to see the store that crash leaves).
    pub fn keep_pending(&self, n: usize) {
        self.lock().pending.truncate(n);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreState> {
        self.state.lock().expect("MemStateStore lock poisoned")
    }
}

fn apply_batch(tree: &mut BTreeMap<Vec<u8>, Vec<u8>>, batch: &KvBatch) {
    for (k, v) in &batch.ops {
        match v {
            Some(v) => tree.insert(k.clone(), v.clone()),
            None => tree.remove(k),
        };
    }
}

impl StateStore for MemStateStore {
    fn tree(&self, name: &str) -> io::Result<Arc<dyn KvTree>> {
        self.lock().current.entry(name.to_owned()).or_default();
        Ok(Arc::new(MemTree { store: self.clone(), name: name.to_owned() }))
    }

    fn drop_tree(&self, name: &str) -> io::Result<()> {
        let mut st = self.lock();
        st.current.remove(name);
        st.pending.push((name.to_owned(), None));
        Ok(())
    }

    fn flush(&self) -> BoxFuture<'static, io::Result<()>> {
        let mut st = self.lock();
        let st = &mut *st;
        for (name, batch) in std::mem::take(&mut st.pending) {
            match batch {
                Some(b) => apply_batch(st.durable.entry(name).or_default(), &b),
                None => {
                    st.durable.remove(&name);
                }
            }
        }
        Box::pin(async { Ok(()) })
    }
}

struct MemTree {
    store: MemStateStore,
    name: String,
}

impl MemTree {
    fn with<T>(&self, f: impl FnOnce(&BTreeMap<Vec<u8>, Vec<u8>>) -> T) -> T {
        let st = self.store.lock();
        match st.current.get(&self.name) {
            Some(t) => f(t),
            None => f(&BTreeMap::new()),
        }
    }
}

impl KvTree for MemTree {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.with(|t| t.get(key).cloned()))
    }

    fn apply(&self, batch: KvBatch) -> io::Result<()> {
        let mut st = self.store.lock();
        apply_batch(st.current.entry(self.name.clone()).or_default(), &batch);
        st.pending.push((self.name.clone(), Some(batch)));
        Ok(())
    }

    fn floor(&self, key: &[u8]) -> io::Result<Option<KvPair>> {
        Ok(self.with(|t| t.range(..=key.to_vec()).next_back().map(|(k, v)| (k.clone(), v.clone()))))
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> io::Result<Vec<KvPair>> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self.with(|t| {
            t.range(from.to_vec()..to.to_vec()).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unsynced_writes_and_names_are_lost_in_a_crash() -> io::Result<()> {
        let disk = MemDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir)?;
        let a = disk.open(&dir.join("a"), true)?;
        a.write_all_at(b"durable", 0)?;
        a.sync_data().await?;
        disk.sync_dir(dir).await?;
        a.write_all_at(b"+lost", 7)?;
        let b = disk.open(&dir.join("b"), true)?;
        b.write_all_at(b"x", 0)?;
        b.sync_data().await?; // synced data, but the name was never made durable
        disk.crash(None);
        assert_eq!(disk.list_dir(dir)?, vec!["a".to_string()]);
        let a = disk.open(&dir.join("a"), false)?;
        assert_eq!(a.len()?, 7);
        Ok(())
    }

    #[tokio::test]
    async fn a_torn_write_keeps_a_prefix() -> io::Result<()> {
        let disk = MemDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir)?;
        let a = disk.open(&dir.join("a"), true)?;
        a.write_all_at(b"abc", 0)?;
        a.sync_data().await?;
        disk.sync_dir(dir).await?;
        a.write_all_at(b"defgh", 3)?;
        disk.crash(Some(&mut |n| n / 2));
        let a = disk.open(&dir.join("a"), false)?;
        let mut buf = vec![0; a.len()? as usize];
        a.read_exact_at(&mut buf, 0)?;
        assert_eq!(buf, b"abcde");
        Ok(())
    }

    #[tokio::test]
    async fn lying_fsync_persists_nothing() -> io::Result<()> {
        let disk = MemDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir)?;
        let a = disk.open(&dir.join("a"), true)?;
        disk.sync_dir(dir).await?;
        disk.set_fsync_lies(true);
        a.write_all_at(b"abc", 0)?;
        a.sync_data().await?;
        disk.crash(None);
        assert_eq!(disk.open(&dir.join("a"), false)?.len()?, 0);
        Ok(())
    }

    #[tokio::test]
    async fn unflushed_batches_are_lost_in_a_crash() -> io::Result<()> {
        let s = MemStateStore::default();
        let t = s.tree("t")?;
        let mut b = KvBatch::default();
        b.put(*b"k", *b"1");
        t.apply(b)?;
        s.flush().await?;
        let mut b = KvBatch::default();
        b.put(*b"k", *b"2");
        t.apply(b)?;
        assert_eq!(t.get(b"k")?, Some(b"2".to_vec()));
        s.crash();
        assert_eq!(t.get(b"k")?, Some(b"1".to_vec()));
        Ok(())
    }
}
