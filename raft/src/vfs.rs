//! The file-system seam: the segment log does all its I/O through [`Vfs`] and [`VFile`], so the
//! simulator can substitute a disk that loses unsynced writes when its host crashes.
//!
//! Reads and writes are synchronous: they touch the page cache and return in microseconds. The
//! two operations that wait for the device, [`VFile::sync_data`] and [`Vfs::sync_dir`], return
//! futures, so that a real implementation can run them off the async threads and a simulated one
//! can model their latency on the simulated clock.

use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

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
#[derive(Debug, Default, Clone)]
pub struct RealVfs;

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
        let file = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        Ok(Arc::new(RealFile { file: Arc::new(file) }))
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
}

struct RealFile {
    file: Arc<File>,
}

impl VFile for RealFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> BoxFuture<'static, io::Result<()>> {
        let file = self.file.clone();
        Box::pin(blocking(move || file.sync_data()))
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
        let vfs = RealVfs;
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
}
