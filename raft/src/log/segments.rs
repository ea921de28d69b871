//! The segment files of one group's log, their in-memory index, and start-up recovery.
//!
//! A log is a directory of segment files named after the index of their first entry
//! (`00000000000000000042.seg`), each a sequence of [frames](super::frame). Entries are contiguous
//! across segments. This type does the synchronous work (writes into the page cache, reads,
//! truncation); making writes durable is the flusher's job (see [`super::store`]), which asks
//! [`Segments::take_dirty`] what to sync.

use std::io;
use std::ops::Range;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::frame;
use super::frame::FrameError;
use crate::types::Entry;
use crate::types::LogId;
use crate::vfs::VFile;
use crate::vfs::Vfs;

const SUFFIX: &str = ".seg";

/// A directory whose entries changed and must be synced, with the file system it lives on.
pub type DirToSync = (Arc<dyn Vfs>, PathBuf);

struct Segment {
    first_index: u64,
    path: PathBuf,
    file: Arc<dyn VFile>,
    /// Byte position of entry `first_index + i` is `positions[i]`.
    positions: Vec<u64>,
    /// End of the last entry.
    end: u64,
}

impl Segment {
    fn next_index(&self) -> u64 {
        self.first_index + self.positions.len() as u64
    }

    /// Byte range of entries `[a, b)` of this segment (indexes relative to `first_index`).
    fn byte_range(&self, a: usize, b: usize) -> Range<u64> {
        let start = self.positions[a];
        let end = if b < self.positions.len() { self.positions[b] } else { self.end };
        start..end
    }
}

/// One segment file as retention sees it: the entries it holds and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub first_index: u64,
    /// One past its last entry.
    pub next_index: u64,
    pub bytes: u64,
}

/// What recovery found and did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub entries: u64,
    /// Bytes cut from the end of the log because they did not form valid, contiguous frames.
    pub truncated_bytes: u64,
    /// Why the tail was cut, if it was.
    pub reason: Option<String>,
}

/// The segments of one log.
pub struct Segments {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    segments: Vec<Segment>,
    segment_bytes_max: u64,
    /// Entries at or below this are purged: never returned, even while their segment remains.
    last_purged: Option<LogId>,
    last_log_id: Option<LogId>,
    /// Files written since the last [`Segments::take_dirty`].
    dirty: Vec<Arc<dyn VFile>>,
    /// Whether files were created since the last `take_dirty` (the directory needs a sync).
    dir_dirty: bool,
    /// Whether reads check each frame's CRC: always, but for the simulator's planted bug
    /// `corrupt-record-served`.
    verify: bool,
}

/// How much of a segment recovery reads at a time.
const RECOVERY_CHUNK_BYTES: usize = 1 << 20;

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}{SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(SUFFIX)?.parse().ok()
}

/// The first intact frame in bytes `[from, len)` of `file` whose index is above `after`: its
/// byte position and index (see [`frame::plausible_after`]). Read a chunk at a time; a frame
/// that runs past its chunk is read whole on its own.
fn intact_after(file: &dyn VFile, from: u64, len: u64, after: u64) -> io::Result<Option<(u64, u64)>> {
    let fixed = frame::FIXED_BYTES as u64;
    let mut start = from;
    while start + fixed <= len {
        let want = (RECOVERY_CHUNK_BYTES as u64).min(len - start);
        let mut chunk = vec![0u8; want as usize];
        file.read_exact_at(&mut chunk, start)?;
        let chunk = Bytes::from(chunk);
        for p in 0..=(chunk.len() - frame::FIXED_BYTES) {
            let Some(flen) = frame::plausible_after(&chunk[p..], after) else { continue };
            let at = start + p as u64;
            if at + flen as u64 > len {
                continue;
            }
            let bytes = if p + flen <= chunk.len() {
                chunk.slice(p..p + flen)
            } else {
                let mut whole = vec![0u8; flen];
                file.read_exact_at(&mut whole, at)?;
                Bytes::from(whole)
            };
            if let Ok((entry, _)) = frame::decode(&bytes) {
                return Ok(Some((at, entry.log_id.index)));
            }
        }
        start += want - fixed + 1;
    }
    Ok(None)
}

impl Segments {
    /// Opens the log in `dir`, cutting a torn tail. Cuts are made durable before this returns,
    /// so a later crash cannot resurrect them.
    ///
    /// A bad frame followed by an intact one in the same file is not a torn tail: a torn write
    /// leaves nothing intact after the frame it tore. It is damage to entries that were
    /// written whole, and this replica may have acknowledged them to its leader, so cutting
    /// there could lose entries a quorum was counted on. Recovery then refuses to open the log
    /// (`InvalidData`, naming the entry and the byte); the replica stays down until an operator
    /// moves it elsewhere (see `ARCHITECTURE.md`, "Disk faults").
    pub async fn recover(
        vfs: Arc<dyn Vfs>,
        dir: &Path,
        segment_bytes_max: u64,
        last_purged: Option<LogId>,
        verify: bool,
    ) -> io::Result<(Self, RecoveryReport)> {
        vfs.create_dir_all(dir)?;
        let mut report = RecoveryReport::default();
        let mut found: Vec<(u64, String)> =
            vfs.list_dir(dir)?.into_iter().filter_map(|n| parse_segment_name(&n).map(|i| (i, n))).collect();
        found.sort();
        let purged_index = last_purged.map(|l| l.index);

        let mut segments: Vec<Segment> = Vec::new();
        let mut last_log_id: Option<LogId> = None;
        let mut cut = false;
        let mut removed_any = false;
        // The index the next segment must start at. A segment that recovery finds empty still
        // sets it: its entries were lost, so a later segment (whose entries a truncation's sync
        // may have made durable) would start after a hole.
        let mut next_expected: Option<u64> = None;
        for (first_index, name) in found {
            let path = dir.join(&name);
            if cut {
                vfs.remove_file(&path)?;
                removed_any = true;
                continue;
            }
            // A gap between segments is allowed only where everything before it is purged.
            if let Some(expected) = next_expected
                && expected != first_index
            {
                let prev_last = expected.saturating_sub(1);
                if purged_index.is_some_and(|p| p >= prev_last)
                    && first_index <= purged_index.unwrap_or(0) + 1
                {
                    for s in segments.drain(..) {
                        vfs.remove_file(&s.path)?;
                        removed_any = true;
                    }
                    last_log_id = None;
                } else {
                    report.reason =
                        Some(format!("segment {name} starts at {first_index}, expected {expected}"));
                    cut = true;
                    vfs.remove_file(&path)?;
                    removed_any = true;
                    continue;
                }
            }
            let file = vfs.open(&path, false)?;
            // Read in chunks, not whole: a node opening thousands of replicas at start-up holds
            // about one chunk (or one frame) per replica being recovered, not one segment.
            let len = file.len()?;
            let mut pending = Bytes::new(); // Undecoded bytes, from file offset `pos`.
            let mut read_to = 0u64;
            let mut positions = Vec::new();
            let mut pos = 0u64;
            let mut bad: Option<String> = None;
            while !(pending.is_empty() && read_to >= len) {
                match frame::decode_verified(&pending, verify) {
                    Ok((entry, flen)) => {
                        let expected = first_index + positions.len() as u64;
                        if entry.log_id.index != expected {
                            bad = Some(format!(
                                "entry at byte {pos} of {name} has index {}, expected {expected}",
                                entry.log_id.index
                            ));
                            break;
                        }
                        positions.push(pos);
                        last_log_id = Some(entry.log_id);
                        pos += flen as u64;
                        pending = pending.slice(flen..);
                    }
                    Err(FrameError::Truncated { need, have }) if read_to < len => {
                        let want = (RECOVERY_CHUNK_BYTES as u64).max((need - have) as u64).min(len - read_to);
                        let mut joined = Vec::with_capacity(pending.len() + want as usize);
                        joined.extend_from_slice(&pending);
                        joined.resize(pending.len() + want as usize, 0);
                        file.read_exact_at(&mut joined[pending.len()..], read_to)?;
                        read_to += want;
                        pending = Bytes::from(joined);
                    }
                    Err(e @ (FrameError::Truncated { .. } | FrameError::Corrupt(_))) => {
                        bad = Some(format!("{name} at byte {pos}: {e}"));
                        break;
                    }
                    // Neither damage nor a torn tail: refused as it is, nothing cut.
                    Err(e @ FrameError::Newer { .. }) => {
                        return Err(io::Error::new(
                            io::ErrorKind::Unsupported,
                            format!("the log in {}: {name} at byte {pos}: {e}", dir.display()),
                        ));
                    }
                }
            }
            if let Some(reason) = bad {
                let expected = first_index + positions.len() as u64;
                if let Some((at, index)) = intact_after(file.as_ref(), pos + 1, len, expected)? {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the log in {} is damaged: entry {expected} ({reason}) is followed by intact entry {index} at byte {at}, so it is not a torn write; this replica will not start (move it to another node)",
                            dir.display()
                        ),
                    ));
                }
                report.truncated_bytes += len - pos;
                report.reason = Some(reason);
                file.set_len(pos)?;
                file.sync_data().await?;
                cut = true;
            }
            report.entries += positions.len() as u64;
            next_expected = Some(first_index + positions.len() as u64);
            if positions.is_empty() {
                drop(file);
                vfs.remove_file(&path)?;
                removed_any = true;
                continue;
            }
            segments.push(Segment { first_index, path, file, positions, end: pos });
        }

        // Segments wholly at or below the purge point are no longer needed.
        if let Some(p) = purged_index {
            while segments.first().is_some_and(|s| s.next_index() <= p + 1) {
                let s = segments.remove(0);
                vfs.remove_file(&s.path)?;
                removed_any = true;
            }
        }
        if removed_any {
            vfs.sync_dir(dir).await?;
        }
        if segments.is_empty() {
            last_log_id = None;
        }
        let last_log_id = last_log_id.max(last_purged);
        report.segments = segments.len();
        Ok((
            Self {
                vfs,
                dir: dir.to_owned(),
                segments,
                segment_bytes_max,
                last_purged,
                last_log_id,
                dirty: Vec::new(),
                dir_dirty: false,
                verify,
            },
            report,
        ))
    }

    pub fn last_log_id(&self) -> Option<LogId> {
        self.last_log_id
    }

    pub fn last_purged(&self) -> Option<LogId> {
        self.last_purged
    }

    /// Index of the first readable entry.
    pub fn first_index(&self) -> Option<u64> {
        let first = self.segments.first()?.first_index;
        let from = self.last_purged.map_or(first, |p| (p.index + 1).max(first));
        (self.last_log_id.is_some_and(|l| l.index >= from)).then_some(from)
    }

    /// Writes `entries` (which must follow the last entry) into the page cache, all or nothing:
    /// when a write fails (a full disk), the log is as before the call, files included, so the
    /// same append can be tried again.
    pub fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        let segments = self.segments.len();
        let active = self.segments.last().map(|s| (s.end, s.positions.len()));
        let dirty = self.dirty.len();
        let r = self.append_all(entries);
        if r.is_err() {
            for s in self.segments.drain(segments..) {
                let _ = self.vfs.remove_file(&s.path);
            }
            if let (Some(s), Some((end, positions))) = (self.segments.last_mut(), active) {
                s.end = end;
                s.positions.truncate(positions);
                // Shrinking needs no space; if it fails the next write overwrites the bytes.
                let _ = s.file.set_len(end);
            }
            self.dirty.truncate(dirty);
        }
        r
    }

    fn append_all(&mut self, entries: &[Entry]) -> io::Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let first_index = first.log_id.index;
        if let Some(last) = self.last_log_id
            && first_index != last.index + 1
        {
            return Err(io::Error::other(format!(
                "append at index {first_index} does not follow the last entry {}",
                last.index
            )));
        }
        // The entries go to the active segment while they fit, then on into new segments: a
        // batch (a follower's replication batch, a leader's coalesced proposal) never makes a
        // segment exceed `segment_bytes_max` unless a single entry does, so retention can free
        // every segment below the log start.
        let mut new_segment = match self.segments.last() {
            None => true,
            Some(s) => s.next_index() != first_index,
        };
        let mut filled = if new_segment { 0 } else { self.segments.last().map_or(0, |s| s.end) };
        let (mut run_first, mut buf, mut positions) = (first_index, Vec::new(), Vec::new());
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.log_id.index, first_index + i as u64, "appended entries must be contiguous");
            let start = buf.len();
            frame::encode(e, &mut buf);
            let used = filled + start as u64;
            if used > 0 && used + (buf.len() - start) as u64 > self.segment_bytes_max {
                // This frame starts a new segment; what came before it fills the current one.
                let frame = buf.split_off(start);
                if !buf.is_empty() {
                    self.write_run(run_first, new_segment, &buf, &positions)?;
                }
                (run_first, new_segment, filled, buf) = (e.log_id.index, true, 0, frame);
                positions.clear();
                positions.push(0);
            } else {
                positions.push(start as u64);
            }
        }
        self.write_run(run_first, new_segment, &buf, &positions)?;
        self.last_log_id = Some(entries.last().expect("non-empty").log_id);
        Ok(())
    }

    /// Writes encoded frames starting with entry `first` at the end of the active segment, or of
    /// a new segment when `new_segment`; `positions` are the frames' offsets in `buf`.
    fn write_run(&mut self, first: u64, new_segment: bool, buf: &[u8], positions: &[u64]) -> io::Result<()> {
        if new_segment {
            let path = self.dir.join(segment_name(first));
            let file = self.vfs.open(&path, true)?;
            // A leftover file of that name (from a cut tail) must not keep stale bytes.
            file.set_len(0)?;
            self.segments.push(Segment { first_index: first, path, file, positions: Vec::new(), end: 0 });
            self.dir_dirty = true;
        }
        let seg = self.segments.last_mut().expect("a segment exists");
        seg.file.write_all_at(buf, seg.end)?;
        seg.positions.extend(positions.iter().map(|p| seg.end + p));
        seg.end += buf.len() as u64;
        if !self.dirty.last().is_some_and(|f| Arc::ptr_eq(f, &seg.file)) {
            self.dirty.push(seg.file.clone());
        }
        Ok(())
    }

    /// The files to sync (and whether the directory must be synced) to make every write so
    /// far durable.
    pub fn take_dirty(&mut self) -> (Vec<Arc<dyn VFile>>, Option<DirToSync>) {
        let dir = std::mem::take(&mut self.dir_dirty).then(|| (self.vfs.clone(), self.dir.clone()));
        (std::mem::take(&mut self.dirty), dir)
    }

    /// Removes every entry after `last` (all of them for `None`). Returns the files to sync.
    pub fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<(Vec<Arc<dyn VFile>>, bool)> {
        let keep_next = last.map_or(0, |l| l.index + 1);
        let mut synced = Vec::new();
        let mut removed = false;
        while let Some(seg) = self.segments.last_mut() {
            if seg.first_index >= keep_next {
                let seg = self.segments.pop().expect("checked");
                self.vfs.remove_file(&seg.path)?;
                removed = true;
                continue;
            }
            let keep = (keep_next - seg.first_index) as usize;
            if keep < seg.positions.len() {
                let new_end = seg.positions[keep];
                seg.file.set_len(new_end)?;
                seg.positions.truncate(keep);
                seg.end = new_end;
                synced.push(seg.file.clone());
            }
            break;
        }
        self.last_log_id = match last {
            // Truncating after a point at or past the end removes nothing.
            Some(l) if self.last_log_id.is_some_and(|cur| l.index >= cur.index) => self.last_log_id,
            Some(l) if self.last_purged.is_none_or(|p| l > p) => Some(l),
            _ => self.last_purged,
        };
        Ok((synced, removed))
    }

    /// Forgets entries up to and including `upto` and deletes segments holding nothing else.
    /// Returns whether a file was removed (the directory then needs a sync).
    pub fn purge(&mut self, upto: LogId) -> io::Result<bool> {
        self.last_purged = Some(upto);
        let mut removed = false;
        while self.segments.first().is_some_and(|s| s.next_index() <= upto.index + 1) {
            let seg = self.segments.remove(0);
            self.vfs.remove_file(&seg.path)?;
            removed = true;
        }
        if self.last_log_id.is_none_or(|l| l < upto) {
            self.last_log_id = Some(upto);
        }
        Ok(removed)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn vfs(&self) -> &Arc<dyn Vfs> {
        &self.vfs
    }

    /// Reads entries in `[start, end)`, stopping early (after at least one entry) once
    /// `bytes_max` bytes are read. Entries outside the readable range are an error.
    pub fn read(&self, start: u64, end: u64, bytes_max: usize) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let first = self.first_index();
        let last = self.last_log_id.map(|l| l.index);
        match (first, last) {
            (Some(f), Some(l)) if start >= f && end <= l + 1 => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "log entries [{start}, {end}) are not in the log (first {first:?}, last {last:?})"
                    ),
                ));
            }
        }
        let mut next = start;
        let mut bytes = 0usize;
        // The first segment whose first index is <= start.
        let mut si = self.segments.partition_point(|s| s.first_index <= start).saturating_sub(1);
        while next < end && si < self.segments.len() {
            let seg = &self.segments[si];
            let a = (next - seg.first_index) as usize;
            let mut b = ((end - seg.first_index) as usize).min(seg.positions.len());
            // Bound the read by bytes, but read at least one entry.
            let budget = bytes_max.saturating_sub(bytes) as u64;
            let mut range = seg.byte_range(a, b);
            while b > a + 1 && range.end - range.start > budget {
                b = a + (b - a).div_ceil(2);
                range = seg.byte_range(a, b);
            }
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            seg.file.read_exact_at(&mut buf, range.start)?;
            let mut buf = Bytes::from(buf);
            for i in a..b {
                let (entry, len) = frame::decode_verified(&buf, self.verify).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("log entry {}: {e}", seg.first_index + i as u64),
                    )
                })?;
                let want = seg.first_index + i as u64;
                if entry.log_id.index != want {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("log entry at index {want} claims index {}", entry.log_id.index),
                    ));
                }
                out.push(entry);
                buf = buf.slice(len..);
            }
            bytes += (range.end - range.start) as usize;
            next = seg.first_index + b as u64;
            // Stop when the budget is spent or it cut this segment's read short: moving on to
            // the next segment would skip the rest of this one.
            if bytes >= bytes_max || next < seg.next_index() {
                break;
            }
            si += 1;
        }
        Ok(out)
    }

    /// Total bytes in segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.end).sum()
    }

    /// The segment files, oldest first; the last one is the one being appended to.
    pub fn infos(&self) -> Vec<SegmentInfo> {
        self.segments
            .iter()
            .map(|s| SegmentInfo { first_index: s.first_index, next_index: s.next_index(), bytes: s.end })
            .collect()
    }

    /// Changes the size past which a new segment is started; takes effect at the next append.
    pub fn set_segment_bytes_max(&mut self, bytes: u64) {
        self.segment_bytes_max = bytes;
    }
}
