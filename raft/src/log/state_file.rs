//! The log's small durable state: the vote and the last purged log id.
//!
//! Stored in one file with two fixed slots, written alternately, each with a sequence number and
//! a CRC (the superblock-copies idea of TigerBeetle). A torn write can only damage the slot being
//! written, so the other slot still holds the previous state. The file is never renamed or
//! recreated, so a write needs one `fdatasync` and no directory sync.

use std::io;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde::Serialize;

use crate::types::LogId;
use crate::types::Vote;
use crate::vfs::VFile;
use crate::vfs::Vfs;

const SLOT_BYTES: usize = 4096;
const SLOT_HEADER_BYTES: usize = 8;
/// The slot format this build writes, in the top byte of a slot's length field (0: every slot
/// written so far). A build reads every version up to its own and refuses a newer one by name:
/// taking it for an empty slot would forget the vote.
pub const STATE_VERSION: u32 = 0;
const VERSION_SHIFT: u32 = 24;
const LEN_MASK: u32 = (1 << VERSION_SHIFT) - 1;

/// What the state file records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogState {
    pub vote: Option<Vote>,
    pub last_purged: Option<LogId>,
}

#[derive(Serialize, Deserialize)]
struct Slot {
    seq: u64,
    state: LogState,
}

pub struct StateFile {
    file: Arc<dyn VFile>,
    seq: u64,
    state: LogState,
}

impl StateFile {
    /// Opens the file, creating it (durably) if absent, and loads the newest valid slot.
    pub async fn open(vfs: &dyn Vfs, dir: &Path) -> io::Result<Self> {
        let path = dir.join("state");
        let existed = vfs.exists(&path);
        let file = vfs.open(&path, true)?;
        if !existed {
            file.set_len((2 * SLOT_BYTES) as u64)?;
            file.sync_data().await?;
            vfs.sync_dir(dir).await?;
        }
        let mut best: Option<Slot> = None;
        for i in 0..2 {
            if let Some(slot) = read_slot(file.as_ref(), i)?
                && best.as_ref().is_none_or(|b| slot.seq > b.seq)
            {
                best = Some(slot);
            }
        }
        let (seq, state) = best.map(|s| (s.seq, s.state)).unwrap_or_default();
        Ok(Self { file, seq, state })
    }

    pub fn state(&self) -> &LogState {
        &self.state
    }

    /// Writes `state` durably: when this returns, a crash cannot lose it.
    pub async fn save(&mut self, state: LogState) -> io::Result<()> {
        let seq = self.seq + 1;
        let body = postcard::to_stdvec(&Slot { seq, state: state.clone() }).map_err(io::Error::other)?;
        assert!(body.len() + SLOT_HEADER_BYTES <= SLOT_BYTES, "log state must fit a slot");
        let mut buf = Vec::with_capacity(SLOT_HEADER_BYTES + body.len());
        buf.extend_from_slice(&(body.len() as u32 | STATE_VERSION << VERSION_SHIFT).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        buf.extend_from_slice(&body);
        let slot = (seq % 2) as usize;
        // A full disk is waited out, as the log's appends do (see `LogStore::append`).
        loop {
            match self.file.write_all_at(&buf, (slot * SLOT_BYTES) as u64) {
                Ok(()) => break,
                Err(e) if crate::vfs::is_disk_full(&e) => {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await
                }
                Err(e) => return Err(e),
            }
        }
        self.file.sync_data().await?;
        self.seq = seq;
        self.state = state;
        Ok(())
    }
}

fn read_slot(file: &dyn VFile, i: usize) -> io::Result<Option<Slot>> {
    let mut buf = vec![0u8; SLOT_BYTES];
    match file.read_exact_at(&mut buf, (i * SLOT_BYTES) as u64) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let word = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    let (version, len) = (word >> VERSION_SHIFT, (word & LEN_MASK) as usize);
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > SLOT_BYTES - SLOT_HEADER_BYTES {
        return Ok(None);
    }
    let body = &buf[SLOT_HEADER_BYTES..SLOT_HEADER_BYTES + len];
    if crc32c::crc32c(body) != crc {
        return Ok(None);
    }
    if version > STATE_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "log state slot {i} was written by a newer Eddy: format version {version}, this build reads up to version {STATE_VERSION}; run the newer build (a downgrade is not supported)"
            ),
        ));
    }
    Ok(postcard::from_bytes::<Slot>(body).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDisk;
    use crate::types::log_id;

    #[tokio::test]
    async fn a_slot_of_a_newer_format_is_refused_by_name_not_taken_for_empty() -> io::Result<()> {
        let (disk, dir, mut f) = fresh().await?;
        f.save(LogState { vote: Some(vote(3)), last_purged: None }).await?;
        drop(f);
        let file = disk.open(&dir.join("state"), false)?;
        // Slot 1 holds it (sequence 1); this build wrote it as version 0.
        let mut word = [0u8; 4];
        file.read_exact_at(&mut word, SLOT_BYTES as u64)?;
        assert_eq!(u32::from_le_bytes(word) >> VERSION_SHIFT, 0);
        let newer = u32::from_le_bytes(word) | 1 << VERSION_SHIFT;
        file.write_all_at(&newer.to_le_bytes(), SLOT_BYTES as u64)?;
        let err = StateFile::open(&disk, dir).await.err().expect("a newer format");
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(err.to_string().contains("newer Eddy"), "{err}");
        Ok(())
    }

    /// A state file just created in directory `/g` of an empty disk.
    async fn fresh() -> io::Result<(MemDisk, &'static Path, StateFile)> {
        let disk = MemDisk::new();
        let dir = Path::new("/g");
        disk.create_dir_all(dir)?;
        let f = StateFile::open(&disk, dir).await?;
        Ok((disk, dir, f))
    }

    fn vote(term: u64) -> Vote {
        openraft::Vote::new(term, 1)
    }

    #[tokio::test]
    async fn survives_crashes_and_torn_slot_writes() -> io::Result<()> {
        let (disk, dir, mut f) = fresh().await?;
        assert_eq!(f.state(), &LogState::default());
        for term in 1..=5 {
            f.save(LogState { vote: Some(vote(term)), last_purged: Some(log_id(term, term * 10)) }).await?;
        }
        disk.crash(None);
        let f = StateFile::open(&disk, dir).await?;
        assert_eq!(f.state().vote, Some(vote(5)));
        assert_eq!(f.state().last_purged, Some(log_id(5, 50)));

        // A write torn at every possible length leaves either the old or the new state.
        for keep in 0..64 {
            let mut f = StateFile::open(&disk, dir).await?;
            let before = f.state().clone();
            let file = disk.open(&dir.join("state"), false)?;
            file.sync_data().await?;
            let new = LogState { vote: Some(vote(100 + keep as u64)), last_purged: None };
            // Write without syncing, then crash keeping `keep` bytes of the change.
            let seq = f.seq + 1;
            let body = postcard::to_stdvec(&Slot { seq, state: new.clone() }).map_err(io::Error::other)?;
            let mut buf = Vec::new();
            buf.extend_from_slice(&(body.len() as u32 | STATE_VERSION << VERSION_SHIFT).to_le_bytes());
            buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
            buf.extend_from_slice(&body);
            let slot = (seq % 2) as usize;
            let partial = &buf[..keep.min(buf.len())];
            file.write_all_at(partial, (slot * SLOT_BYTES) as u64)?;
            file.sync_data().await?;
            let f2 = StateFile::open(&disk, dir).await?;
            assert!(f2.state() == &before || f2.state() == &new, "keep={keep}: {:?}", f2.state());
            // Restore a clean state for the next round.
            f.save(before).await?;
        }
        Ok(())
    }
}
