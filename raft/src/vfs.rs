//! The file-system seam: the segment log does all its I/O through [`Vfs`] and [`VFile`], so the
//! simulator can substitute a disk that loses unsynced writes when its host crashes.
//!
//! Reads and writes are synchronous: they touch the page cache and return in microseconds. The
//! two operations that wait for the device, [`VFile::sync_data`] and [`Vfs::sync_dir`], return
//! futures, so that a real implementation can run them off the async threads and a simulated one
//! can model their latency on the simulated clock.

use std::collections::BTreeMap;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use futures::future::BoxFuture;

/// A directory tree of files.
pub trait Vfs: Send + Sync + 'static {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;

    /// Names of the entries in `path`, sorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;

    fn exists(&self, path: &Path) -> bool;

    /// Opens a file for reading and writing, creating it when `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VFile>>;

    fn remove_file(&self, path: &Path) -> io::Result<()>;

    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;

    /// Makes the directory's entries (created and removed files) durable.
    fn sync_dir(&self, path: &Path) -> BoxFuture<'static, io::Result<()>>;

    /// The whole of a small file the node only reads (a certificate, a key), opened read-only:
    /// at most `max` bytes, else an error.
    fn read_small(&self, path: &Path, max: u64) -> io::Result<Vec<u8>>;

    /// Bytes that unprivileged writes may still use on the filesystem holding `path`.
    fn available_bytes(&self, path: &Path) -> io::Result<u64>;

    /// Sets whether space is below the node's reserve (`storage_min_free_bytes`): while it is,
    /// log appends wait as on a full disk, so the reserve is left to the state store, votes and
    /// the metadata the node must still write (see `LogStore::append`).
    fn set_space_low(&self, low: bool);

    fn space_low(&self) -> bool;
}

/// Whether `e` says the disk (or the user's quota) is full: a write that wrote nothing durable
/// and may succeed once space is freed, unlike a failed `fsync`.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

/// An open file.
#[allow(clippy::len_without_is_empty)]
pub trait VFile: Send + Sync + 'static {
    /// Fills `buf` from `offset`; fails with `UnexpectedEof` if the file is shorter.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    fn len(&self) -> io::Result<u64>;

    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes every write so far durable (`fdatasync`).
    fn sync_data(&self) -> BoxFuture<'static, io::Result<()>>;
}

/// The real file system.
///
/// A node can hold more segment and state files than it may keep open (10,000 replicas with two
/// files each is more than many hosts' hard `RLIMIT_NOFILE`), and most of them sit idle. So files
/// are opened on demand and at most `max_open` descriptors stay open, the least recently used
/// closed first (as RocksDB's table cache and Kafka's lazy index files do). A file with writes
/// that are not yet synced keeps its descriptor until the sync: the `fdatasync` that reports a
/// write error must run on a descriptor that was open when the write happened, and a removed
/// file's pending sync must still find it. Handles ([`VFile`]) are cheap and never fail to
/// exist; reopening one whose descriptor was closed can fail like any open.
#[derive(Clone)]
pub struct RealVfs {
    descriptors: Arc<Descriptors>,
}

impl RealVfs {
    /// A file system that keeps at most `max_open` descriptors open (at least 1), except for files
    /// with unsynced writes, which keep theirs until the sync, and that batches the syncs of
    /// files on `data_dir`'s filesystem (see `Syncer`).
    pub fn open(max_open: usize, data_dir: &Path) -> io::Result<Self> {
        Self::build(max_open, Some(data_dir))
    }

    /// As [`Self::open`], without batching: every file gets its own `fdatasync` (tests, tools).
    pub fn new(max_open: usize) -> Self {
        Self::build(max_open, None).expect("start the log syncer thread")
    }

    fn build(max_open: usize, data_dir: Option<&Path>) -> io::Result<Self> {
        Ok(Self {
            descriptors: Arc::new(Descriptors {
                space_low: Default::default(),
                max_open: max_open.max(1),
                state: Mutex::new(DescriptorState::default()),
                opens: AtomicU64::new(0),
                syncer: Syncer::start(data_dir)?,
            }),
        })
    }

    /// Descriptors open now.
    pub fn open_descriptors(&self) -> usize {
        self.descriptors.lock().open.len()
    }

    /// Files opened so far, first opens and reopens after a close.
    pub fn opens(&self) -> u64 {
        self.descriptors.opens.load(Ordering::Relaxed)
    }

    /// Syncs done by a `syncfs` together with other files (see `Syncer`).
    pub fn batched_syncs(&self) -> u64 {
        self.descriptors.syncer.batched.load(Ordering::Relaxed)
    }

    /// The most descriptors kept open.
    pub fn max_open(&self) -> usize {
        self.descriptors.max_open
    }
}

impl Default for RealVfs {
    /// 1,024 descriptors: for tests and tools; the node sizes it from its open-file limit.
    fn default() -> Self {
        Self::new(1024)
    }
}

impl std::fmt::Debug for RealVfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealVfs").field("max_open", &self.descriptors.max_open).finish_non_exhaustive()
    }
}

impl Vfs for RealVfs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VFile>> {
        let file = open_rw(path, create)?;
        let id = self.descriptors.insert(Arc::new(file));
        Ok(Arc::new(RealFile { id, path: path.to_owned(), descriptors: self.descriptors.clone() }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn sync_dir(&self, path: &Path) -> BoxFuture<'static, io::Result<()>> {
        let path: PathBuf = path.to_owned();
        Box::pin(blocking(move || File::open(&path)?.sync_all()))
    }

    fn read_small(&self, path: &Path, max: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut buf = Vec::new();
        File::open(path)?.take(max + 1).read_to_end(&mut buf)?;
        too_big(path, buf.len() as u64, max)?;
        Ok(buf)
    }

    fn available_bytes(&self, path: &Path) -> io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
        Ok(st.blocks_available().saturating_mul(st.fragment_size()))
    }

    fn set_space_low(&self, low: bool) {
        self.descriptors.space_low.store(low, Ordering::Relaxed);
    }

    fn space_low(&self) -> bool {
        self.descriptors.space_low.load(Ordering::Relaxed)
    }
}

/// The error of [`Vfs::read_small`] for a file over its limit.
pub fn too_big(path: &Path, len: u64, max: u64) -> io::Result<()> {
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: more than the {max} bytes expected", path.display()),
        ));
    }
    Ok(())
}

fn open_rw(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)
}

/// The open descriptors of one [`RealVfs`], and its syncer.
struct Descriptors {
    space_low: std::sync::atomic::AtomicBool,
    max_open: usize,
    state: Mutex<DescriptorState>,
    opens: AtomicU64,
    syncer: Syncer,
}

#[derive(Default)]
struct DescriptorState {
    next_id: u64,
    /// Advances on every use; orders `by_use`.
    clock: u64,
    open: BTreeMap<u64, OpenFile>,
    /// Open files by last use, least recent first: `clock` at last use → file id.
    by_use: BTreeMap<u64, u64>,
}

struct OpenFile {
    file: Arc<File>,
    last_use: u64,
    /// Writes since the last completed sync; a file with any keeps its descriptor.
    unsynced: u64,
}

impl Descriptors {
    fn lock(&self) -> std::sync::MutexGuard<'_, DescriptorState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a newly opened file and returns its id.
    fn insert(&self, file: Arc<File>) -> u64 {
        self.opens.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.put(id, file);
        st.evict(self.max_open, id);
        id
    }

    /// The descriptor of file `id`, reopened from `path` if it was closed. `write` counts an
    /// unsynced write, which pins the descriptor until [`Self::synced`].
    fn get(&self, id: u64, path: &Path, write: bool) -> io::Result<Arc<File>> {
        {
            let mut st = self.lock();
            if let Some(f) = st.touch(id, write) {
                return Ok(f);
            }
        }
        // Closed: reopen outside the lock (another thread may race us; the first insert wins).
        let file = Arc::new(open_rw(path, false)?);
        self.opens.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        if let Some(f) = st.touch(id, write) {
            return Ok(f);
        }
        st.put(id, file.clone());
        if write {
            st.open.get_mut(&id).expect("just put").unsynced += 1;
        }
        st.evict(self.max_open, id);
        Ok(file)
    }

    /// File `id` is open with `unsynced` writes counted before a sync started; that sync has
    /// completed, so those writes are durable.
    /// Descriptors kept open past the budget because of unsynced writes close here.
    fn synced(&self, id: u64, before: u64) {
        let mut st = self.lock();
        if let Some(f) = st.open.get_mut(&id) {
            f.unsynced = f.unsynced.saturating_sub(before);
        }
        st.evict(self.max_open, u64::MAX);
    }

    /// The open descriptor of `id` and its unsynced write count, or `None` if it is closed. A
    /// descriptor is closed only when every write through it has been synced, so a closed file
    /// has nothing to sync.
    fn for_sync(&self, id: u64) -> Option<(Arc<File>, u64)> {
        let mut st = self.lock();
        let file = st.touch(id, false)?;
        let unsynced = st.open[&id].unsynced;
        Some((file, unsynced))
    }

    fn remove(&self, id: u64) {
        let mut st = self.lock();
        if let Some(f) = st.open.remove(&id) {
            st.by_use.remove(&f.last_use);
        }
    }
}

impl DescriptorState {
    fn touch(&mut self, id: u64, write: bool) -> Option<Arc<File>> {
        self.clock += 1;
        let now = self.clock;
        let f = self.open.get_mut(&id)?;
        self.by_use.remove(&f.last_use);
        f.last_use = now;
        if write {
            f.unsynced += 1;
        }
        self.by_use.insert(now, id);
        Some(f.file.clone())
    }

    fn put(&mut self, id: u64, file: Arc<File>) {
        self.clock += 1;
        self.open.insert(id, OpenFile { file, last_use: self.clock, unsynced: 0 });
        self.by_use.insert(self.clock, id);
    }

    /// Closes the least recently used descriptors without unsynced writes (never `keep`) until
    /// at most `max` are open. Descriptors in use by another thread close when it is done.
    fn evict(&mut self, max: usize, keep: u64) {
        if self.open.len() <= max {
            return;
        }
        let mut victims = Vec::new();
        let mut excess = self.open.len() - max;
        for (&tick, &id) in &self.by_use {
            if excess == 0 {
                break;
            }
            if id != keep && self.open[&id].unsynced == 0 {
                victims.push((tick, id));
                excess -= 1;
            }
        }
        for (tick, id) in victims {
            self.by_use.remove(&tick);
            self.open.remove(&id);
        }
    }
}

/// Makes files durable for every group of a node together.
///
/// Each election costs a vote sync and an append sync on two nodes, and after a node dies each
/// survivor runs hundreds at once: one `fdatasync` per file on tokio's blocking pool made the
/// failover mostly context switches and flush requests (see ARCHITECTURE.md, *Multi-raft at
/// scale*). A syncer thread takes every sync request queued when it wakes: one file is synced
/// with `fdatasync` as before; several are synced with one `syncfs` per filesystem, which writes
/// back every dirty file there and flushes the device once (1,000 files with a small append
/// each: 2.4 ms, against 140 ms one `fdatasync` after another and 36 ms from 16 threads,
/// `bench/sync_probe.py`). `syncfs` reports write-back errors of the filesystem since Linux
/// 5.8; on older kernels every file gets its own `fdatasync`. A `syncfs` error takes the
/// filesystem's logs offline for good (see [`Witness`]): every group on it stops accepting
/// writes, as after any failed sync.
struct Syncer {
    tx: std::sync::mpsc::Sender<SyncRequest>,
    /// Files made durable by a `syncfs` together with others.
    batched: Arc<AtomicU64>,
}

struct SyncRequest {
    file: Arc<File>,
    done: tokio::sync::oneshot::Sender<io::Result<()>>,
}

/// Most requests one round takes.
const SYNC_ROUND_MAX: usize = 4096;

impl Syncer {
    /// Batches syncs of files on the filesystem of `witness_dir` (opened now); with `None`, or on
    /// a kernel whose `syncfs` does not report errors, every file gets its own `fdatasync`.
    fn start(witness_dir: Option<&Path>) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<SyncRequest>();
        let witness = match witness_dir {
            Some(dir) if syncfs_reports_errors() => {
                let file = File::open(dir)?;
                let device = std::os::unix::fs::MetadataExt::dev(&file.metadata()?);
                Some(Witness { device, file, failed: None })
            }
            _ => None,
        };
        let batched = Arc::new(AtomicU64::new(0));
        let counter = batched.clone();
        // Production only: the simulator's disk is `MemDisk`, which never gets here. The thread
        // ends when the `RealVfs` and every file of it are dropped.
        #[allow(clippy::disallowed_methods)]
        let spawned = std::thread::Builder::new()
            .name("eddy-sync".into())
            .spawn(move || sync_rounds(&rx, witness, &counter));
        spawned?;
        Ok(Self { tx, batched })
    }

    async fn sync(&self, file: Arc<File>) -> io::Result<()> {
        let (done, result) = tokio::sync::oneshot::channel();
        let sent = self.tx.send(SyncRequest { file, done });
        if sent.is_err() {
            return Err(io::Error::other("the log syncer thread is not running"));
        }
        result.await.unwrap_or_else(|_| Err(io::Error::other("the log syncer thread stopped")))
    }
}

/// The filesystem a `syncfs` may flush for the syncer: its device, and a descriptor opened
/// when the node started, before any log write. `syncfs` reports a write-back error of the
/// filesystem once per descriptor that was open when it happened; through this one, every error
/// since start-up is reported at the next `syncfs`, whichever file it struck.
struct Witness {
    device: u64,
    file: File,
    /// Set by the first error a `syncfs` reported: which file it struck is unknown, so from then
    /// on every sync on this filesystem fails (the log directory is offline, as Kafka takes a log
    /// directory offline after an I/O error).
    failed: Option<String>,
}

fn sync_rounds(
    rx: &std::sync::mpsc::Receiver<SyncRequest>,
    mut witness: Option<Witness>,
    batched: &AtomicU64,
) {
    while let Ok(first) = rx.recv() {
        let mut round = vec![first];
        while round.len() < SYNC_ROUND_MAX {
            match rx.try_recv() {
                Ok(r) => round.push(r),
                Err(_) => break,
            }
        }
        // The requests for the witness's filesystem are synced together; any other file (none,
        // when the logs live under the data directory) gets its own `fdatasync`.
        let mut together = Vec::new();
        for r in round {
            let device = r.file.metadata().map(|m| std::os::unix::fs::MetadataExt::dev(&m));
            match (&witness, device) {
                (_, Err(e)) => {
                    let _ = r.done.send(Err(e));
                }
                (Some(w), Ok(d)) if d == w.device => together.push(r),
                _ => {
                    let _ = r.done.send(r.file.sync_data());
                }
            }
        }
        let Some(w) = witness.as_mut() else { continue };
        if w.failed.is_none() {
            match together.len() {
                0 => continue,
                1 => {
                    let r = together.pop().expect("one");
                    let _ = r.done.send(r.file.sync_data());
                    continue;
                }
                n => {
                    batched.fetch_add(n as u64, Ordering::Relaxed);
                    if let Err(e) = syncfs(&w.file) {
                        tracing::error!(
                            "syncfs of the log filesystem failed; every log sync fails from now on: {e}"
                        );
                        w.failed = Some(e.to_string());
                    }
                }
            }
        }
        for r in together {
            let result = match &w.failed {
                None => Ok(()),
                Some(e) => {
                    Err(io::Error::other(format!("an earlier syncfs of the log filesystem failed: {e}")))
                }
            };
            let _ = r.done.send(result);
        }
    }
}

/// Writes back every dirty file of `file`'s filesystem and flushes its device.
fn syncfs(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `syncfs` only reads the descriptor, which `file` keeps open for the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syncfs(file.as_raw_fd()) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// True if this kernel's `syncfs` reports write-back errors (Linux 5.8 and later).
fn syncfs_reports_errors() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts =
        release.trim().split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (5, 8)
}

/// A handle to a file of a [`RealVfs`]; its descriptor may be closed and reopened underneath.
struct RealFile {
    id: u64,
    path: PathBuf,
    descriptors: Arc<Descriptors>,
}

impl VFile for RealFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.descriptors.get(self.id, &self.path, false)?.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.descriptors.get(self.id, &self.path, true)?.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.descriptors.get(self.id, &self.path, false)?.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.descriptors.get(self.id, &self.path, true)?.set_len(len)
    }

    fn sync_data(&self) -> BoxFuture<'static, io::Result<()>> {
        let opened = self.descriptors.for_sync(self.id);
        let descriptors = self.descriptors.clone();
        let id = self.id;
        Box::pin(async move {
            let Some((file, unsynced)) = opened else { return Ok(()) };
            descriptors.syncer.sync(file).await?;
            descriptors.synced(id, unsynced);
            Ok(())
        })
    }
}

impl Drop for RealFile {
    fn drop(&mut self) {
        self.descriptors.remove(self.id);
    }
}

/// Runs a blocking system call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(format!("blocking I/O task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn real_vfs_round_trip() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let vfs = RealVfs::default();
        let sub = dir.path().join("a/b");
        vfs.create_dir_all(&sub)?;
        let f = vfs.open(&sub.join("x"), true)?;
        f.write_all_at(b"hello", 0)?;
        f.write_all_at(b"!", 5)?;
        f.sync_data().await?;
        assert_eq!(f.len()?, 6);
        let mut buf = [0u8; 6];
        f.read_exact_at(&mut buf, 0)?;
        assert_eq!(&buf, b"hello!");
        f.set_len(2)?;
        assert_eq!(f.len()?, 2);
        assert!(f.read_exact_at(&mut buf, 0).is_err(), "reading past the end must fail");
        assert_eq!(vfs.list_dir(&sub)?, vec!["x".to_string()]);
        vfs.sync_dir(&sub).await?;
        vfs.remove_file(&sub.join("x"))?;
        assert!(!vfs.exists(&sub.join("x")));
        Ok(())
    }

    #[tokio::test]
    async fn descriptors_stay_within_the_budget_and_files_reopen() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let vfs = RealVfs::new(2);
        let files: Vec<_> =
            (0..5).map(|i| vfs.open(&dir.path().join(format!("f{i}")), true)).collect::<io::Result<_>>()?;
        assert!(vfs.open_descriptors() <= 2, "clean files beyond the budget are closed");
        // Unsynced writes pin their descriptors: all five stay open until synced.
        for (i, f) in files.iter().enumerate() {
            f.write_all_at(format!("file {i}").as_bytes(), 0)?;
        }
        assert_eq!(vfs.open_descriptors(), 5, "a file with unsynced writes keeps its descriptor");
        // A removed file's pending sync still goes through its open descriptor.
        vfs.remove_file(&dir.path().join("f4"))?;
        for f in &files {
            f.sync_data().await?;
        }
        assert!(vfs.open_descriptors() <= 2, "synced files are closed again: {}", vfs.open_descriptors());
        let mut buf = [0u8; 6];
        let opens = vfs.opens();
        for (i, f) in files.iter().enumerate().take(4) {
            f.read_exact_at(&mut buf, 0)?;
            assert_eq!(&buf, format!("file {i}").as_bytes());
            assert_eq!(f.len()?, 6);
        }
        assert!(vfs.opens() > opens, "closed files were reopened to be read");
        assert!(vfs.open_descriptors() <= 2);
        // A closed file has nothing unsynced; syncing it is a no-op, even once it is gone.
        drop(files);
        assert_eq!(vfs.open_descriptors(), 0, "dropping a handle closes its descriptor");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_syncs_are_made_together() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let vfs = RealVfs::open(4, dir.path())?;
        let files: Vec<_> =
            (0..64).map(|i| vfs.open(&dir.path().join(format!("f{i}")), true)).collect::<io::Result<_>>()?;
        for round in 0..5u8 {
            for f in &files {
                f.write_all_at(&[round; 100], u64::from(round) * 100)?;
            }
            assert_eq!(vfs.open_descriptors(), 64, "unsynced files keep their descriptors");
            let syncs = files.iter().map(|f| f.sync_data());
            for r in futures::future::join_all(syncs).await {
                r?;
            }
            assert!(vfs.open_descriptors() <= 4, "every write is synced: {}", vfs.open_descriptors());
        }
        if syncfs_reports_errors() {
            assert!(vfs.batched_syncs() > 0, "64 syncs at once never shared a syncfs");
        }
        let mut buf = [0u8; 500];
        files[7].read_exact_at(&mut buf, 0)?;
        assert_eq!(buf[499], 4);
        Ok(())
    }
}
