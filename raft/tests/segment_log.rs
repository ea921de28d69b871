//! Tests of the segment log through its public API: recovery from torn and corrupt tails, crash
//! semantics on the simulated disk, segment rolling, truncation, purging, vote durability, and a
//! model-based property test of random operation sequences.
//!
//! Every test runs on a [`MemDisk`], whose `crash` loses whatever was not synced, so "durable"
//! below always means "survives `crash`", not "was written".

use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use eddy_raft::log::LogConfig;
use eddy_raft::log::LogStore;
use eddy_raft::log::RecoveryReport;
use eddy_raft::log::frame;
use eddy_raft::log::state_file;
use eddy_raft::log::state_file::StateFile;
use eddy_raft::log::store::REPLICATION_READ_BYTES_MAX;
use eddy_raft::mem::MemDisk;
use eddy_raft::types::C;
use eddy_raft::types::Entry;
use eddy_raft::types::EntryPayload;
use eddy_raft::types::LogId;
use eddy_raft::types::Payload;
use eddy_raft::types::Vote;
use eddy_raft::types::log_id;
use eddy_raft::types::log_term;
use eddy_raft::vfs::Vfs;
use openraft::RaftLogReader;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::OneshotReceiverOf;
use proptest::prelude::*;

/// Small enough that a few entries fill a segment, so every test crosses segment boundaries.
const SEGMENT_BYTES_SMALL: u64 = 200;
/// Frame overhead of a data entry: header (8) plus term, index and kind (17).
const FRAME_OVERHEAD_BYTES: usize = 25;

type FlushRx = OneshotReceiverOf<C, io::Result<()>>;

fn log_dir() -> &'static Path {
    Path::new("/group/log")
}

/// A payload whose bytes depend on term and index, so an entry rewritten after a truncation (a
/// new term at the same index) never compares equal to the one it replaced.
fn entry(term: u64, index: u64, payload_len: usize) -> Entry {
    let bytes: Vec<u8> = (0..payload_len as u64).map(|i| (i * 131 + index * 7 + term * 13) as u8).collect();
    Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(Payload(Bytes::from(bytes))) }
}

/// Entries `first..=last` with varied payload sizes (0 to 60 bytes) and a term that grows every
/// five entries.
fn entries(first: u64, last: u64) -> Vec<Entry> {
    (first..=last).map(|i| entry(1 + i / 5, i, ((i * 37) % 61) as usize)).collect()
}

fn frame_bytes(e: &Entry) -> usize {
    let mut buf = Vec::new();
    frame::encode(e, &mut buf);
    buf.len()
}

async fn open(disk: &MemDisk, segment_bytes_max: u64) -> io::Result<(LogStore, RecoveryReport)> {
    LogStore::open(
        Arc::new(disk.clone()),
        log_dir(),
        LogConfig { segment_bytes_max, on_sync: None, ..LogConfig::default() },
    )
    .await
}

/// Appends `batch` and returns the receiver that completes once the flusher made it durable.
async fn append(store: &mut LogStore, batch: Vec<Entry>) -> io::Result<FlushRx> {
    let (tx, rx) = C::oneshot();
    store.append(batch, IOFlushed::signal(tx)).await?;
    Ok(rx)
}

async fn flushed(rx: FlushRx) -> io::Result<()> {
    rx.await.map_err(|e| io::Error::other(format!("the flusher dropped a callback: {e}")))?
}

async fn append_durable(store: &mut LogStore, batch: Vec<Entry>) -> io::Result<()> {
    let rx = append(store, batch).await?;
    flushed(rx).await
}

/// Waits for callbacks of a store that was dropped (and whose disk may have crashed meanwhile),
/// so that its flusher is gone before the next store opens; their results do not matter.
async fn drain(pending: &mut Vec<FlushRx>) {
    for rx in pending.drain(..) {
        let _ = rx.await;
    }
}

/// Checks the log's state and contents: `entries` are exactly the readable entries.
async fn assert_log(
    store: &mut LogStore,
    purged: Option<LogId>,
    entries: &[Entry],
    ctx: &str,
) -> io::Result<()> {
    let state = store.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, purged, "{ctx}: last purged log id");
    assert_eq!(state.last_log_id, entries.last().map(|e| e.log_id).or(purged), "{ctx}: last log id");
    let mut reader = store.get_log_reader().await;
    assert_eq!(reader.first_index(), entries.first().map(|e| e.log_id.index), "{ctx}: first index");
    let got = reader.try_get_log_entries(..).await?;
    assert_eq!(got, entries, "{ctx}: entries");
    if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
        let got = reader.read(first.log_id.index, last.log_id.index + 1, usize::MAX)?;
        assert_eq!(got, entries, "{ctx}: entries through LogReader::read");
    }
    Ok(())
}

/// The segment files of the log, as (first index, path), in log order.
fn segment_files(disk: &MemDisk) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for name in disk.list_dir(log_dir())? {
        if let Some(stem) = name.strip_suffix(".seg") {
            let first: u64 = stem.parse().map_err(io::Error::other)?;
            out.push((first, log_dir().join(&name)));
        }
    }
    Ok(out)
}

fn segment_firsts(disk: &MemDisk) -> io::Result<Vec<u64>> {
    Ok(segment_files(disk)?.into_iter().map(|(first, _)| first).collect())
}

fn read_file(disk: &MemDisk, path: &Path) -> io::Result<Vec<u8>> {
    let file = disk.open(path, false)?;
    let mut buf = vec![0u8; usize::try_from(file.len()?).map_err(io::Error::other)?];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// Replaces the contents of `path` (creating it if needed) and makes the change durable.
async fn write_file(disk: &MemDisk, path: &Path, data: &[u8]) -> io::Result<()> {
    let file = disk.open(path, true)?;
    file.set_len(0)?;
    file.write_all_at(data, 0)?;
    file.sync_data().await?;
    disk.sync_dir(log_dir()).await
}

/// A new disk holding a durable copy of the log directory of `src`, so each case of a sweep
/// starts from the same bytes.
async fn copy_disk(src: &MemDisk) -> io::Result<MemDisk> {
    let dst = MemDisk::new();
    dst.create_dir_all(log_dir())?;
    for name in src.list_dir(log_dir())? {
        let path = log_dir().join(&name);
        write_file(&dst, &path, &read_file(src, &path)?).await?;
    }
    Ok(dst)
}

/// Offsets of the frames in `data`, followed by the end of the last one.
fn frame_offsets(data: &[u8]) -> io::Result<Vec<usize>> {
    let buf = Bytes::copy_from_slice(data);
    let mut offsets = vec![0];
    let mut pos = 0;
    while pos < buf.len() {
        let (_, len) = frame::decode(&buf.slice(pos..)).map_err(io::Error::other)?;
        pos += len;
        offsets.push(pos);
    }
    Ok(offsets)
}

/// A log of `entries(1, 16)` in small segments, all durable. Entries 1..=12 are appended in
/// batches of three; 13..=16 in one batch larger than a segment, which fills the active segment
/// and goes on into new ones, the last of which holds several entries. Returns the disk, the
/// entries, the path of the last segment, and how many entries come before it.
async fn tail_fixture() -> io::Result<(MemDisk, Vec<Entry>, PathBuf, usize)> {
    let disk = MemDisk::new();
    let all = entries(1, 16);
    let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    for batch in all[..12].chunks(3) {
        append_durable(&mut store, batch.to_vec()).await?;
    }
    let tail = all[12..].to_vec();
    assert!(tail.iter().map(frame_bytes).sum::<usize>() as u64 > SEGMENT_BYTES_SMALL, "tail fills a segment");
    append_durable(&mut store, tail).await?;
    drop(store);
    let (first, path) = segment_files(&disk)?.pop().expect("the log has segments");
    assert!(first > 12 && first < 16, "the tail batch ends in a segment of several entries: {first}");
    assert!(segment_files(&disk)?.len() >= 3, "the fixture spans several segments");
    Ok((disk, all, path, first as usize - 1))
}

/// Recovery after the last segment is cut at every byte keeps exactly the complete frames, cuts
/// the file to the end of the last one, reports the partial frame, and leaves a log that takes
/// appends which survive a crash.
#[tokio::test]
async fn recovery_cuts_a_torn_tail_at_every_byte() -> io::Result<()> {
    let (base, all, seg_path, n_before) = tail_fixture().await?;
    let full = read_file(&base, &seg_path)?;
    let offsets = frame_offsets(&full)?;
    for cut in 0..=full.len() {
        let ctx = format!("cut at byte {cut} of {}", full.len());
        let disk = copy_disk(&base).await?;
        write_file(&disk, &seg_path, &full[..cut]).await?;

        let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
        let complete = offsets[1..].iter().filter(|&&end| end <= cut).count();
        let kept_end = offsets[complete];
        let expected = all[..n_before + complete].to_vec();
        assert_log(&mut store, None, &expected, &ctx).await?;
        assert_eq!(report.entries, expected.len() as u64, "{ctx}: report.entries");
        assert_eq!(report.truncated_bytes, (cut - kept_end) as u64, "{ctx}: report.truncated_bytes");
        assert_eq!(report.reason.is_some(), cut != kept_end, "{ctx}: report.reason {:?}", report.reason);
        if kept_end == 0 {
            assert!(!disk.exists(&seg_path), "{ctx}: a segment left without entries is removed");
        } else {
            assert_eq!(read_file(&disk, &seg_path)?.len(), kept_end, "{ctx}: segment length after recovery");
        }

        // A new leader's entry goes where the torn one was, and is durable like any other.
        let next = entry(100, expected.len() as u64 + 1, 30);
        append_durable(&mut store, vec![next.clone()]).await?;
        drop(store);
        disk.crash(None);
        let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
        assert_eq!(report.truncated_bytes, 0, "{ctx}: second recovery cuts nothing");
        assert_eq!(report.reason, None, "{ctx}: second recovery");
        let mut expected = expected;
        expected.push(next);
        assert_log(&mut store, None, &expected, &format!("{ctx}, after an append and a crash")).await?;
    }
    Ok(())
}

/// A flipped byte anywhere in the last segment: in its last frame, recovery cannot tell the
/// damage from a torn write and cuts the log at the start of that frame, reporting why; in any
/// earlier frame, an intact frame follows, so it is damage to entries written whole, which this
/// replica may have acknowledged: recovery refuses the log (`InvalidData`, naming the entry)
/// and leaves the disk as it was. No damaged entry is ever returned.
#[tokio::test]
async fn recovery_cuts_a_damaged_last_frame_and_refuses_damage_before_it_at_every_byte() -> io::Result<()> {
    let (base, all, seg_path, n_before) = tail_fixture().await?;
    let full = read_file(&base, &seg_path)?;
    let offsets = frame_offsets(&full)?;
    let last_start = offsets[offsets.len() - 2];
    for pos in 0..full.len() {
        let ctx = format!("byte {pos} of {} flipped", full.len());
        let disk = copy_disk(&base).await?;
        let mut bad = full.clone();
        bad[pos] ^= 0xff;
        write_file(&disk, &seg_path, &bad).await?;
        // The damaged frame is the one whose bytes include `pos`.
        let damaged = offsets[1..].iter().filter(|&&end| end <= pos).count();

        if pos < last_start {
            let err = match open(&disk, SEGMENT_BYTES_SMALL).await {
                Ok(_) => panic!("{ctx}: recovery opened a log damaged before its last entry"),
                Err(e) => e,
            };
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{ctx}: {err}");
            let named = format!("entry {} ", n_before + damaged + 1);
            assert!(err.to_string().contains(&named), "{ctx}: the error names the {named}: {err}");
            assert_eq!(read_file(&disk, &seg_path)?, bad, "{ctx}: the refused log is left as it was");
            continue;
        }

        let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
        let expected = all[..n_before + damaged].to_vec();
        assert_log(&mut store, None, &expected, &ctx).await?;
        assert!(report.reason.is_some(), "{ctx}: the cut has a reason");
        assert_eq!(report.truncated_bytes, (full.len() - last_start) as u64, "{ctx}: report.truncated_bytes");
        assert_eq!(read_file(&disk, &seg_path)?.len(), last_start, "{ctx}: segment length after recovery");

        // The cut is durable: a crash right after recovery finds a clean log.
        drop(store);
        disk.crash(None);
        let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
        assert_eq!(report.reason, None, "{ctx}: second recovery");
        assert_log(&mut store, None, &expected, &format!("{ctx}, after a crash")).await?;
    }
    Ok(())
}

/// A damaged last frame of an earlier segment (a torn write there, later segments made durable
/// by the same sync) loses everything after it, including whole later segments: the log must
/// stay contiguous. A damaged frame before it in the same segment refuses the log instead.
#[tokio::test]
async fn a_torn_earlier_segment_removes_every_later_segment() -> io::Result<()> {
    let (base, all, _, _) = tail_fixture().await?;
    let files = segment_files(&base)?;
    let (first, path) = files[1].clone();
    let data = read_file(&base, &path)?;
    let offsets = frame_offsets(&data)?;
    assert!(offsets.len() >= 3, "the second segment holds at least two entries");
    let last = offsets.len() - 2;

    let disk = copy_disk(&base).await?;
    let mut bad = data.clone();
    bad[offsets[0] + 5] ^= 0x01;
    write_file(&disk, &path, &bad).await?;
    let err = open(&disk, SEGMENT_BYTES_SMALL).await.err().expect("damage before intact entries is refused");
    assert!(err.to_string().contains(&format!("entry {first} ")), "names the damaged entry: {err}");
    assert_eq!(segment_firsts(&disk)?, segment_firsts(&base)?, "a refused log keeps every segment");

    let disk = copy_disk(&base).await?;
    let mut bad = data.clone();
    // The checksum of the segment's last entry.
    bad[offsets[last] + 5] ^= 0x01;
    write_file(&disk, &path, &bad).await?;
    let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    let kept = first as usize - 1 + last;
    let expected = all[..kept].to_vec();
    assert_log(&mut store, None, &expected, "corrupt last entry of the second segment").await?;
    let reason = report.reason.expect("the cut has a reason");
    assert!(reason.contains("crc32c"), "the reason names the failed check: {reason}");
    assert_eq!(segment_firsts(&disk)?, vec![files[0].0, first], "later segments are removed");
    assert_eq!(read_file(&disk, &path)?.len(), offsets[last]);

    // The log continues from the cut.
    let more = entries(kept as u64 + 1, kept as u64 + 12);
    append_durable(&mut store, more.clone()).await?;
    drop(store);
    disk.crash(None);
    let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    let expected: Vec<Entry> = expected.into_iter().chain(more).collect();
    assert_log(&mut store, None, &expected, "after recovery").await?;
    Ok(())
}

/// A segment that does not follow its predecessor (a hole in the log) ends the log, unless
/// everything before the hole is purged.
#[tokio::test]
async fn recovery_handles_gaps_between_segments() -> io::Result<()> {
    let (base, all, _, _) = tail_fixture().await?;
    let stray: Vec<Entry> = (30..=32).map(|i| entry(9, i, 10)).collect();
    let mut stray_bytes = Vec::new();
    for e in &stray {
        frame::encode(e, &mut stray_bytes);
    }
    let stray_path = log_dir().join(format!("{:020}.seg", 30));

    // Entries 17..=29 are missing: the stray segment is not part of the log.
    let disk = copy_disk(&base).await?;
    write_file(&disk, &stray_path, &stray_bytes).await?;
    let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    assert!(report.reason.is_some(), "the hole is reported");
    assert!(!disk.exists(&stray_path), "the segment after the hole is removed");
    assert_log(&mut store, None, &all, "segment after a hole").await?;
    drop(store);

    // With 1..=29 purged (a snapshot was installed but the old segments were not yet deleted)
    // the stray segment is the log, and the segments before the hole are deleted.
    let disk = copy_disk(&base).await?;
    write_file(&disk, &stray_path, &stray_bytes).await?;
    let purged = log_id(9, 29);
    let mut state = StateFile::open(&disk, log_dir()).await?;
    state.save(state_file::LogState { vote: None, last_purged: Some(purged) }).await?;
    drop(state);
    let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    assert_eq!(report.reason, None);
    assert_eq!(segment_firsts(&disk)?, vec![30]);
    assert_log(&mut store, Some(purged), &stray, "segment after a purged hole").await?;
    drop(store);

    // Valid frames whose indexes skip one are a hole inside a segment, and a segment whose first
    // entry is not the one its name says is misplaced: no torn write does either, and intact
    // frames follow, so recovery refuses the log, naming the entry, and leaves it as it was.
    let next: Vec<Entry> = [17, 18, 20, 21].into_iter().map(|i| entry(9, i, 10)).collect();
    let mut next_bytes = Vec::new();
    for e in &next {
        frame::encode(e, &mut next_bytes);
    }
    let next_path = log_dir().join(format!("{:020}.seg", 17));
    for (bytes, named) in
        [(&next_bytes[..], "entry 19 "), (&next_bytes[frame_bytes(&next[0])..], "entry 17 ")]
    {
        let disk = copy_disk(&base).await?;
        write_file(&disk, &next_path, bytes).await?;
        let err = open(&disk, SEGMENT_BYTES_SMALL).await.err().expect("a hole inside a segment is refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains(named), "names {named}: {err}");
        assert_eq!(read_file(&disk, &next_path)?, bytes, "the refused segment is left as it was");
    }
    Ok(())
}

/// Entries whose flush completed survive a crash; the unflushed tail, torn at every length,
/// leaves exactly its complete frames, and recovery reports the partial one.
#[tokio::test]
async fn a_crash_keeps_flushed_entries_and_tears_the_rest_at_every_byte() -> io::Result<()> {
    // One segment for the whole log, so the unsynced tail is one contiguous extension.
    const SEGMENT_BYTES_LARGE: u64 = 1 << 20;
    let all = entries(1, 16);
    let n_durable = 10;
    let tail_frames: Vec<usize> = all[n_durable..].iter().map(frame_bytes).collect();
    let tail_bytes: usize = tail_frames.iter().sum();
    for keep in 0..=tail_bytes {
        let ctx = format!("crash keeping {keep} of {tail_bytes} unsynced bytes");
        let disk = MemDisk::new();
        let (mut store, _) = open(&disk, SEGMENT_BYTES_LARGE).await?;
        for batch in all[..n_durable].chunks(2) {
            append_durable(&mut store, batch.to_vec()).await?;
        }
        let mut pending = Vec::new();
        for batch in [&all[10..12], &all[12..13], &all[13..16]] {
            pending.push(append(&mut store, batch.to_vec()).await?);
        }
        disk.crash(Some(&mut |n: usize| keep.min(n)));
        drop(store);
        drain(&mut pending).await;

        let (mut store, report) = open(&disk, SEGMENT_BYTES_LARGE).await?;
        let mut complete = 0;
        let mut complete_bytes = 0;
        while complete < tail_frames.len() && complete_bytes + tail_frames[complete] <= keep {
            complete_bytes += tail_frames[complete];
            complete += 1;
        }
        assert_log(&mut store, None, &all[..n_durable + complete], &ctx).await?;
        assert_eq!(report.truncated_bytes, (keep - complete_bytes) as u64, "{ctx}: report.truncated_bytes");
        assert_eq!(report.reason.is_some(), keep != complete_bytes, "{ctx}: report.reason");
    }
    Ok(())
}

/// With segments rolling while entries are unflushed, a crash (clean or tearing any file's
/// unsynced tail) leaves a prefix of what was appended that contains every flushed entry.
#[tokio::test]
async fn a_crash_across_segment_rolls_leaves_a_prefix_with_every_flushed_entry() -> io::Result<()> {
    // Large enough that the last flushed segment has room for an unflushed entry or two, so
    // some crashes keep a torn tail and others lose all of it.
    const SEGMENT_BYTES: u64 = 400;
    const UNFLUSHED_BATCHES: [usize; 7] = [1, 1, 2, 3, 4, 6, 6];
    let n_durable = 17;
    let all = entries(1, (n_durable + UNFLUSHED_BATCHES.iter().sum::<usize>()) as u64);
    let mut recovered_lens = Vec::new();
    for keep in [None, Some(0), Some(1), Some(8), Some(24), Some(25), Some(40), Some(90), Some(usize::MAX)] {
        let ctx = format!("crash keeping {keep:?} unsynced bytes of each file");
        let disk = MemDisk::new();
        let (mut store, _) = open(&disk, SEGMENT_BYTES).await?;
        for e in &all[..n_durable] {
            append_durable(&mut store, vec![e.clone()]).await?;
        }
        let mut pending = Vec::new();
        let mut next = n_durable;
        for size in UNFLUSHED_BATCHES {
            pending.push(append(&mut store, all[next..next + size].to_vec()).await?);
            next += size;
        }
        assert!(segment_files(&disk)?.len() >= 4, "{ctx}: the log rolled");
        match keep {
            None => disk.crash(None),
            Some(keep) => disk.crash(Some(&mut |n: usize| keep.min(n))),
        }
        drop(store);
        drain(&mut pending).await;

        let (mut store, _) = open(&disk, SEGMENT_BYTES).await?;
        let got = store.get_log_reader().await.try_get_log_entries(..).await?;
        assert!(got.len() >= n_durable, "{ctx}: lost flushed entries: {} left", got.len());
        assert_eq!(got[..], all[..got.len()], "{ctx}: not a prefix of the appended entries");
        assert_log(&mut store, None, &got, &ctx).await?;
        recovered_lens.push(got.len());

        // The recovered log takes appends, and a clean crash after a flush loses nothing.
        let more = vec![entry(50, got.len() as u64 + 1, 40), entry(50, got.len() as u64 + 2, 0)];
        append_durable(&mut store, more.clone()).await?;
        drop(store);
        disk.crash(None);
        let (mut store, _) = open(&disk, SEGMENT_BYTES).await?;
        let expected: Vec<Entry> = got.into_iter().chain(more).collect();
        assert_log(&mut store, None, &expected, &format!("{ctx}, appended and crashed again")).await?;
    }
    // The sweep is only meaningful if some crashes lost the unflushed entries and some kept a
    // part of them.
    assert!(recovered_lens.contains(&n_durable), "no crash lost the unflushed entries: {recovered_lens:?}");
    assert!(recovered_lens.iter().any(|&n| n > n_durable), "no crash kept a torn tail: {recovered_lens:?}");
    Ok(())
}

/// A truncation syncs the segment it cuts (and the directory) but not the earlier segments, so
/// it can make later entries durable while earlier, unflushed ones are lost in a crash. Recovery
/// must not then return a log with a hole at its start.
///
/// Before the fix in `Segments::recover`, a first segment found empty was removed and forgotten,
/// so the next segment was accepted without a continuity check: here the log came back as
/// `[4, 5]` with nothing purged, missing entries 1 to 3. (Found by `log_matches_model`.)
#[tokio::test]
async fn a_crash_after_a_truncation_leaves_no_hole_at_the_start() -> io::Result<()> {
    const SEGMENT_BYTES: u64 = 400;
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk, SEGMENT_BYTES).await?;
    let mut pending = Vec::new();
    let mut next = 1;
    // Frames of 25 bytes plus the payload: 1..=3 take 85 bytes, 4 does not fit beside them,
    // 4..=6 take 375, and 7 does not fit beside those.
    for sizes in [&[0][..], &[0, 10], &[300, 0, 0], &[21, 14]] {
        let batch: Vec<Entry> =
            sizes.iter().enumerate().map(|(i, &len)| entry(1, next + i as u64, len)).collect();
        next += sizes.len() as u64;
        pending.push(append(&mut store, batch).await?);
    }
    assert_eq!(segment_firsts(&disk)?, vec![1, 4, 7], "three segments, none flushed");
    store.truncate_after(Some(log_id(1, 5))).await?;
    disk.crash(None);
    drop(store);
    drain(&mut pending).await;

    let (mut store, report) = open(&disk, SEGMENT_BYTES).await?;
    assert_log(&mut store, None, &[], "crash after truncating unflushed segments").await?;
    let reason = report.reason.expect("the hole is reported");
    assert!(reason.contains("starts at 4, expected 1"), "{reason}");
    assert!(segment_files(&disk)?.is_empty());
    let first = entries(1, 3);
    append_durable(&mut store, first.clone()).await?;
    assert_log(&mut store, None, &first, "appended after recovery").await
}

/// A log of `n` entries appended durably in batches of one to four, in small segments.
async fn rolled_log(n: u64, segment_bytes_max: u64) -> io::Result<(MemDisk, LogStore, Vec<Entry>)> {
    let disk = MemDisk::new();
    let all = entries(1, n);
    let (mut store, _) = open(&disk, segment_bytes_max).await?;
    let mut next = 0;
    let mut size = 1;
    while next < all.len() {
        let end = (next + size).min(all.len());
        append_durable(&mut store, all[next..end].to_vec()).await?;
        next = end;
        size = size % 4 + 1;
    }
    Ok((disk, store, all))
}

/// Reads of every range, across any number of segment boundaries, return exactly the entries
/// asked for; byte-bounded reads return a non-empty prefix no more than one frame over the bound.
#[tokio::test]
async fn reads_across_segment_boundaries() -> io::Result<()> {
    let (disk, mut store, all) = rolled_log(60, SEGMENT_BYTES_SMALL).await?;
    let n_segments = segment_files(&disk)?.len();
    assert!(n_segments >= 10, "only {n_segments} segments");
    assert_log(&mut store, None, &all, "rolled log").await?;
    let mut reader = store.get_log_reader().await;
    assert_eq!(reader.bytes(), all.iter().map(frame_bytes).sum::<usize>() as u64);

    for start in 1..=61u64 {
        for end in start..=61u64 {
            let want = &all[(start - 1) as usize..(end - 1) as usize];
            assert_eq!(reader.read(start, end, usize::MAX)?, want, "read({start}, {end})");
            assert_eq!(
                reader.try_get_log_entries(start..end).await?,
                want,
                "try_get_log_entries({start}..{end})"
            );
        }
    }

    // Byte-bounded reads. Before the fix in `Segments::read`, a bound that cut one segment's
    // read short but left budget over went on to the next segment with `next` still inside
    // the current one, and `next - seg.first_index` underflowed: a panic in debug builds, an
    // out-of-bounds index in release. Replication reads (`limited_get_log_entries`) hit this
    // whenever their range crossed a segment boundary after the byte bound took effect.
    let frame_max = all.iter().map(frame_bytes).max().expect("non-empty");
    for bytes_max in [0, 1, 30, 60, 100, 150, 250, 256, 300, 400, 700, 1000, 2500] {
        for start in 1..=60u64 {
            let ctx = format!("read({start}, 61, {bytes_max})");
            let got = reader.read(start, 61, bytes_max)?;
            assert!(!got.is_empty(), "{ctx}: returned nothing");
            assert_eq!(
                got[..],
                all[(start - 1) as usize..][..got.len()],
                "{ctx}: not the entries from {start}"
            );
            let bytes: usize = got.iter().map(frame_bytes).sum();
            assert!(bytes <= bytes_max.max(1) + frame_max, "{ctx}: {bytes} bytes");
        }
    }

    // Openraft may ask for ranges beyond the ends; `try_get_log_entries` returns what exists,
    // while `LogReader::read` insists on the exact range.
    assert_eq!(reader.try_get_log_entries(0..1000).await?, all);
    assert_eq!(reader.try_get_log_entries(..=5).await?, all[..5]);
    assert_eq!(reader.try_get_log_entries(55..).await?, all[54..]);
    assert!(reader.try_get_log_entries(61..70).await?.is_empty());
    assert!(reader.read(7, 7, usize::MAX)?.is_empty());
    for (start, end) in [(0, 3), (59, 62), (61, 62)] {
        let err = reader.read(start, end, usize::MAX).expect_err("out of range");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "read({start}, {end})");
    }
    // Replication reads past the end (a stepped-down leader's task, after its log was
    // truncated) return what exists, possibly nothing, which openraft takes as a heartbeat: an
    // error would stop the group. Entries missing at the start are still an error.
    assert_eq!(reader.limited_get_log_entries(58, 70).await?, all[57..]);
    assert!(reader.limited_get_log_entries(61, 70).await?.is_empty());
    assert!(reader.limited_get_log_entries(0, 3).await.is_err());

    // Reads survive a reopen, which rebuilds the index from the files.
    drop(reader);
    drop(store);
    let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    assert_eq!(report.segments, n_segments);
    assert_log(&mut store, None, &all, "rolled log, reopened").await
}

/// Replication reads return at least one entry and stop near `REPLICATION_READ_BYTES_MAX`,
/// also when the bound takes effect in the middle of a segment that is not the last.
#[tokio::test]
async fn limited_reads_return_an_entry_and_respect_the_byte_bound() -> io::Result<()> {
    const PAYLOAD_BYTES: usize = 64 << 10;
    const SEGMENT_BYTES: u64 = 1 << 20;
    let n = 200u64;
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk, SEGMENT_BYTES).await?;
    let all: Vec<Entry> = (1..=n).map(|i| entry(1, i, PAYLOAD_BYTES)).collect();
    for batch in all.chunks(10) {
        append_durable(&mut store, batch.to_vec()).await?;
    }
    let frame = PAYLOAD_BYTES + FRAME_OVERHEAD_BYTES;
    assert!((n as usize * frame) > 3 * REPLICATION_READ_BYTES_MAX / 2, "the log exceeds the bound");
    assert!(segment_files(&disk)?.len() > 10);

    let mut reader = store.get_log_reader().await;
    for start in [1, 7, 15, 16, 33, 100] {
        let got = reader.limited_get_log_entries(start, n + 1).await?;
        let ctx = format!("limited_get_log_entries({start}, {})", n + 1);
        assert!(!got.is_empty(), "{ctx}: returned nothing");
        assert_eq!(got[..], all[(start - 1) as usize..][..got.len()], "{ctx}: wrong entries");
        assert!(got.len() * frame <= REPLICATION_READ_BYTES_MAX + frame, "{ctx}: {} entries", got.len());
        // Loosely: a bounded read returns a good part of the bound, not a trickle.
        assert!(got.len() * frame >= REPLICATION_READ_BYTES_MAX / 4, "{ctx}: only {} entries", got.len());
    }
    assert_eq!(reader.limited_get_log_entries(190, n + 1).await?, all[189..]);
    assert_eq!(reader.limited_get_log_entries(n, n + 1).await?, all[n as usize - 1..]);
    Ok(())
}

/// Checks the log against the expectation while open, after a reopen, and after a crash: the
/// operation under test must have been durable when it returned. Returns the reopened store.
async fn assert_durable(
    disk: &MemDisk,
    mut store: LogStore,
    purged: Option<LogId>,
    expected: &[Entry],
    ctx: &str,
) -> io::Result<LogStore> {
    assert_log(&mut store, purged, expected, ctx).await?;
    drop(store);
    let (mut store, report) = open(disk, SEGMENT_BYTES_SMALL).await?;
    assert_eq!(report.reason, None, "{ctx}: reopen");
    assert_log(&mut store, purged, expected, &format!("{ctx}, reopened")).await?;
    drop(store);
    disk.crash(None);
    let (mut store, report) = open(disk, SEGMENT_BYTES_SMALL).await?;
    assert_eq!(report.reason, None, "{ctx}: after a crash");
    assert_log(&mut store, purged, expected, &format!("{ctx}, after a crash")).await?;
    Ok(store)
}

/// `truncate_after` to the middle of a segment, to a segment boundary and to nothing is durable
/// when it returns, and the log continues from the truncation point.
#[tokio::test]
async fn truncate_after_is_durable_and_the_log_continues() -> io::Result<()> {
    let (base, store, all) = rolled_log(40, SEGMENT_BYTES_SMALL).await?;
    drop(store);
    let firsts = segment_firsts(&base)?;
    assert!(firsts.len() >= 5 && firsts[3] - firsts[2] >= 3, "segments: {firsts:?}");
    let cases = [
        ("the middle of a segment", Some(firsts[2] + 1), &firsts[..3]),
        ("a segment boundary", Some(firsts[3] - 1), &firsts[..3]),
        ("the last entry", Some(40), &firsts[..]),
        ("nothing", None, &firsts[..0]),
    ];
    for (what, last, files) in cases {
        let ctx = format!("truncate_after({last:?}), {what}");
        let disk = copy_disk(&base).await?;
        let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
        let kept = last.map_or(0, |l| l as usize);
        store.truncate_after(kept.checked_sub(1).map(|i| all[i].log_id)).await?;
        assert_eq!(segment_firsts(&disk)?, files, "{ctx}: segment files");
        let mut store = assert_durable(&disk, store, None, &all[..kept], &ctx).await?;
        if let Some(l) = last {
            let err = store.get_log_reader().await.read(l, l + 2, usize::MAX).expect_err("beyond the end");
            assert_eq!(err.kind(), io::ErrorKind::NotFound, "{ctx}");
        }

        // A new leader overwrites the truncated suffix.
        let more: Vec<Entry> = (kept as u64 + 1..=kept as u64 + 9).map(|i| entry(20, i, 33)).collect();
        append_durable(&mut store, more[..4].to_vec()).await?;
        append_durable(&mut store, more[4..].to_vec()).await?;
        let expected: Vec<Entry> = all[..kept].iter().cloned().chain(more).collect();
        assert_durable(&disk, store, None, &expected, &format!("{ctx}, then appended")).await?;
    }
    Ok(())
}

/// `purge` of part of a segment, of whole segments, and beyond the last entry (a snapshot
/// install) is durable when it returns; purged entries are never returned again, and after
/// purging beyond the end the log continues at the entry after the purge point.
#[tokio::test]
async fn purge_is_durable_and_hides_purged_entries() -> io::Result<()> {
    let (base, store, all) = rolled_log(40, SEGMENT_BYTES_SMALL).await?;
    drop(store);
    let firsts = segment_firsts(&base)?;
    assert!(firsts.len() >= 5 && firsts[3] - firsts[2] >= 3, "segments: {firsts:?}");
    let last_term = log_term(&all[39].log_id);
    let cases = [
        ("part of a segment", all[firsts[2] as usize].log_id, &firsts[2..]),
        ("whole segments", all[firsts[3] as usize - 2].log_id, &firsts[3..]),
        ("the last entry", all[39].log_id, &firsts[..0]),
        ("beyond the last entry", log_id(last_term + 1, 50), &firsts[..0]),
    ];
    for (what, upto, files) in cases {
        let ctx = format!("purge({upto}), {what}");
        let disk = copy_disk(&base).await?;
        let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
        store.purge(upto).await?;
        assert_eq!(segment_firsts(&disk)?, files, "{ctx}: segment files");
        let kept = all.get(upto.index as usize..).unwrap_or_default();
        let mut store = assert_durable(&disk, store, Some(upto), kept, &ctx).await?;

        let mut reader = store.get_log_reader().await;
        let err = reader.read(upto.index, upto.index + 1, usize::MAX).expect_err("purged");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{ctx}: reading the purge point");
        assert_eq!(reader.try_get_log_entries(1..upto.index + 3).await?, kept[..kept.len().min(2)], "{ctx}");
        // Purging again at or below the purge point changes nothing.
        store.purge(log_id(1, 1)).await?;
        assert_log(&mut store, Some(upto), kept, &format!("{ctx}, purged again lower")).await?;

        // The log continues after its last entry, or after the purge point if that is later.
        let next = upto.index.max(40) + 1;
        let more: Vec<Entry> = (next..next + 6).map(|i| entry(last_term + 2, i, 45)).collect();
        append_durable(&mut store, more.clone()).await?;
        let expected: Vec<Entry> = kept.iter().cloned().chain(more).collect();
        assert_durable(&disk, store, Some(upto), &expected, &format!("{ctx}, then appended")).await?;
    }
    Ok(())
}

/// The reader lists the segment files as they are on disk (contiguous, sizes adding up to the
/// log's bytes), and a new segment size applies from the next append on.
#[tokio::test]
async fn segments_are_listed_and_their_size_can_change() -> io::Result<()> {
    let (disk, mut store, all) = rolled_log(40, SEGMENT_BYTES_SMALL).await?;
    let reader = store.reader();
    let segs = reader.segments();
    assert_eq!(segs.iter().map(|s| s.first_index).collect::<Vec<_>>(), segment_firsts(&disk)?);
    for w in segs.windows(2) {
        assert_eq!(w[0].next_index, w[1].first_index, "segments are contiguous: {segs:?}");
    }
    assert_eq!(segs.last().map(|s| s.next_index), Some(41));
    assert_eq!(segs.iter().map(|s| s.bytes).sum::<u64>(), reader.bytes());
    assert!(segs.len() >= 5, "{segs:?}");

    // Larger segments: the next entries go on filling the active segment past the old size.
    reader.set_segment_bytes_max(1 << 20);
    let before = segs.len();
    let more: Vec<Entry> = (41..=60).map(|i| entry(log_term(&all[39].log_id), i, 40)).collect();
    for e in more {
        append_durable(&mut store, vec![e]).await?;
    }
    let segs = reader.segments();
    assert_eq!(segs.len(), before, "no new segment: {segs:?}");
    assert!(segs.last().is_some_and(|s| s.bytes > SEGMENT_BYTES_SMALL && s.next_index == 61), "{segs:?}");
    Ok(())
}

/// One append larger than a segment (a follower's replication batch) is split across segments,
/// each within the bound unless it holds a single larger entry, and reads and recovery see the
/// same log. (Before, a batch went whole into the active segment, and followers kept hundreds
/// of kilobytes that retention could not free.)
#[tokio::test]
async fn a_large_batch_is_split_across_segments() -> io::Result<()> {
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    let mut all = entries(1, 40);
    // An entry larger than a segment, in the middle of the next batch.
    let mut second = entries(41, 60);
    second[5] = entry(log_term(&second[5].log_id), 46, 3 * SEGMENT_BYTES_SMALL as usize);
    append_durable(&mut store, all.clone()).await?;
    append_durable(&mut store, second.clone()).await?;
    all.extend(second);
    let segs = store.reader().segments();
    assert!(segs.len() >= 10, "{segs:?}");
    for s in &segs {
        let single = s.next_index - s.first_index == 1;
        assert!(s.bytes <= SEGMENT_BYTES_SMALL || single, "a segment over the bound holds one entry: {s:?}");
    }
    assert!(
        segs.iter().any(|s| s.first_index == 46 && s.next_index == 47),
        "the large entry alone: {segs:?}"
    );
    assert_log(&mut store, None, &all, "after the appends").await?;
    drop(store);
    disk.crash(None);
    let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    assert_eq!(report.truncated_bytes, 0, "{report:?}");
    assert_log(&mut store, None, &all, "after recovery").await?;
    Ok(())
}

/// Recovery reads a segment in chunks (1 MiB): a 3 MiB segment comes back whole; a corrupt byte
/// past the first chunks, with intact frames after it, is refused; a corrupt last frame is cut.
#[tokio::test]
async fn recovery_of_a_segment_larger_than_its_read_chunk() -> io::Result<()> {
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk, 64 << 20).await?;
    let all: Vec<Entry> = (1..=3200).map(|i| entry(1, i, 1000)).collect();
    for batch in all.chunks(100) {
        append_durable(&mut store, batch.to_vec()).await?;
    }
    drop(store);
    let (_, path) = segment_files(&disk)?.pop().expect("one segment");
    let data = read_file(&disk, &path)?;
    assert!(data.len() > 3 << 20, "{} bytes", data.len());
    let (mut store, report) = open(&disk, 64 << 20).await?;
    assert_eq!(report.truncated_bytes, 0, "{report:?}");
    assert_log(&mut store, None, &all, "a large segment recovered").await?;
    drop(store);

    let offsets = frame_offsets(&data)?;
    // Damage past 2 MiB, found by recovery's later chunks, and damage to the file's last frame.
    let bad_frame = offsets.iter().position(|o| *o > 2 << 20).expect("a frame past 2 MiB") - 1;
    let mut corrupt = data.clone();
    corrupt[offsets[bad_frame] + 40] ^= 0xff;
    write_file(&disk, &path, &corrupt).await?;
    let err = open(&disk, 64 << 20).await.err().expect("damage before intact entries is refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains(&format!("entry {} ", bad_frame + 1)), "{err}");

    let last = offsets.len() - 2;
    let mut torn = data.clone();
    torn[offsets[last] + 40] ^= 0xff;
    write_file(&disk, &path, &torn).await?;
    let (mut store, report) = open(&disk, 64 << 20).await?;
    assert_eq!(report.truncated_bytes, (data.len() - offsets[last]) as u64, "{report:?}");
    assert_log(&mut store, None, &all[..last], "cut at the damaged last frame").await
}

/// An entry damaged on disk while the log runs is never returned: the read fails with
/// `InvalidData`, naming it, and the log's failure observer hears of it (the node stops).
#[tokio::test]
async fn a_damaged_entry_read_while_running_fails_the_read_and_is_reported() -> io::Result<()> {
    let disk = MemDisk::new();
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = failures.clone();
    let config = LogConfig {
        segment_bytes_max: 64 << 20,
        on_failure: Some(Arc::new(move |why: &str| seen.lock().expect("lock").push(why.to_owned()))),
        ..LogConfig::default()
    };
    let (mut store, _) = LogStore::open(Arc::new(disk.clone()), log_dir(), config).await?;
    let all: Vec<Entry> = (1..=10).map(|i| entry(1, i, 100)).collect();
    append_durable(&mut store, all.clone()).await?;
    let (_, path) = segment_files(&disk)?.pop().expect("one segment");
    let offsets = frame_offsets(&read_file(&disk, &path)?)?;
    assert!(disk.corrupt(&path, offsets[4] + 60, 0x20), "the byte exists");

    let reader = store.reader();
    assert_eq!(reader.read(1, 5, usize::MAX)?, all[..4], "entries before the damage still read");
    let err = reader.read(1, 11, usize::MAX).expect_err("a read across the damaged entry fails");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("log entry 5"), "names the entry: {err}");
    let mut raft_reader = store.get_log_reader().await;
    assert!(raft_reader.try_get_log_entries(5..6).await.is_err(), "replication reads fail too");
    let failures = failures.lock().expect("lock").clone();
    assert_eq!(failures.len(), 2, "each failed read is reported: {failures:?}");
    assert!(failures[0].contains("damaged"), "{failures:?}");
    drop(store);

    // Restarted, the node's recovery refuses the log.
    let err = open(&disk, 64 << 20).await.err().expect("recovery refuses the damaged log");
    assert!(err.to_string().contains("entry 5 "), "{err}");
    Ok(())
}

/// A purge interrupted after recording the purge point but before deleting the segments is
/// completed by recovery.
#[tokio::test]
async fn recovery_completes_an_interrupted_purge() -> io::Result<()> {
    let (base, store, all) = rolled_log(40, SEGMENT_BYTES_SMALL).await?;
    drop(store);
    let firsts = segment_firsts(&base)?;
    let cases = [
        (all[firsts[3] as usize - 2].log_id, &firsts[3..]),
        (all[39].log_id, &firsts[..0]),
        (log_id(99, 45), &firsts[..0]),
    ];
    for (upto, files) in cases {
        let ctx = format!("interrupted purge({upto})");
        let disk = copy_disk(&base).await?;
        let mut state = StateFile::open(&disk, log_dir()).await?;
        state.save(state_file::LogState { vote: None, last_purged: Some(upto) }).await?;
        drop(state);
        let (store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
        assert_eq!(report.reason, None, "{ctx}");
        let kept = all.get(upto.index as usize..).unwrap_or_default();
        assert_eq!(segment_firsts(&disk)?, files, "{ctx}: purged segments are deleted");
        assert_durable(&disk, store, Some(upto), kept, &ctx).await?;
    }
    Ok(())
}

/// A saved vote survives a crash, and the vote and the purge point do not overwrite each other
/// in the state file.
#[tokio::test]
async fn vote_survives_a_crash() -> io::Result<()> {
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    assert!(store.is_pristine());
    assert_eq!(store.get_log_reader().await.read_vote().await?, None);
    let mut last_vote = None;
    for term in 1..=5u64 {
        let vote: Vote = openraft::Vote::new(term, term % 3);
        store.save_vote(&vote).await?;
        last_vote = Some(vote);
        drop(store);
        disk.crash(None);
        store = open(&disk, SEGMENT_BYTES_SMALL).await?.0;
        assert_eq!(store.get_log_reader().await.read_vote().await?, last_vote, "term {term}");
        assert!(!store.is_pristine());
    }

    append_durable(&mut store, entries(1, 10)).await?;
    store.purge(log_id(1, 4)).await?;
    drop(store);
    disk.crash(None);
    let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    assert_eq!(store.get_log_reader().await.read_vote().await?, last_vote, "vote after a purge");
    let vote: Vote = openraft::Vote::new(6, 1);
    store.save_vote(&vote).await?;
    drop(store);
    disk.crash(None);
    let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    assert_eq!(store.get_log_reader().await.read_vote().await?, Some(vote));
    assert_log(&mut store, Some(log_id(1, 4)), &entries(5, 10), "purge after a vote").await
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    /// Appends entries with these payload sizes, without waiting for the flush.
    Append(Vec<usize>),
    /// Waits until every append so far is durable.
    Flush,
    /// Truncates after an entry picked from the purge point to the last entry.
    TruncateAfter(prop::sample::Index),
    /// Purges up to a durable entry picked from the first to the last durable one.
    Purge(prop::sample::Index),
    /// Purges beyond the last entry by this many indexes, as a snapshot install does.
    PurgeBeyond(u64),
    /// Reads from an entry picked from the readable ones, bounded to this many bytes.
    Read(prop::sample::Index, usize),
    Reopen,
    /// Crashes the disk; with `Some(t)`, each file keeps `t/255` of its unsynced tail.
    Crash(Option<u8>),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => prop::collection::vec(0usize..120, 1..=4).prop_map(Op::Append),
        4 => Just(Op::Flush),
        2 => any::<prop::sample::Index>().prop_map(Op::TruncateAfter),
        1 => any::<prop::sample::Index>().prop_map(Op::Purge),
        1 => (1u64..4).prop_map(Op::PurgeBeyond),
        2 => (any::<prop::sample::Index>(), 0usize..600).prop_map(|(i, b)| Op::Read(i, b)),
        2 => Just(Op::Reopen),
        3 => prop::option::of(any::<u8>()).prop_map(Op::Crash),
    ]
}

/// What the log should hold: the entries after the purge point, and how far it is durable.
struct Model {
    purged: Option<LogId>,
    /// The readable entries; the first has index `purged + 1`.
    entries: Vec<Entry>,
    /// Every entry at or below this index survives a crash.
    durable_index: u64,
    /// The term of new entries; a truncation starts a new one, as a new leader would.
    term: u64,
}

impl Model {
    fn last(&self) -> Option<LogId> {
        self.entries.last().map(|e| e.log_id).or(self.purged)
    }

    fn next_index(&self) -> u64 {
        self.last().map_or(1, |l| l.index + 1)
    }

    fn first_index(&self) -> u64 {
        self.purged.map_or(1, |p| p.index + 1)
    }
}

/// Runs `ops` against a log on a fresh disk and against the model, comparing after each step.
async fn run_model(ops: Vec<Op>) -> io::Result<()> {
    const SEGMENT_BYTES: u64 = 400;
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk, SEGMENT_BYTES).await?;
    let mut model = Model { purged: None, entries: Vec::new(), durable_index: 0, term: 1 };
    let mut pending: Vec<FlushRx> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        let ctx = format!("step {step}: {op:?}");
        match op {
            Op::Append(sizes) => {
                let first = model.next_index();
                let batch: Vec<Entry> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| entry(model.term, first + i as u64, len))
                    .collect();
                pending.push(append(&mut store, batch.clone()).await?);
                model.entries.extend(batch);
            }
            Op::Flush => {
                for rx in pending.drain(..) {
                    flushed(rx).await?;
                }
                model.durable_index = model.last().map_or(0, |l| l.index);
            }
            Op::TruncateAfter(pick) => {
                // Openraft truncates only entries after the committed (so after the purged) one.
                let n_kept = pick.index(model.entries.len() + 1);
                let last = match n_kept {
                    0 => model.purged,
                    n => Some(model.entries[n - 1].log_id),
                };
                store.truncate_after(last).await?;
                model.entries.truncate(n_kept);
                model.durable_index = model.durable_index.min(last.map_or(0, |l| l.index));
                model.term += 1;
            }
            Op::Purge(pick) => {
                // Openraft purges only applied, hence durable, entries.
                let n_durable = (model.durable_index + 1).saturating_sub(model.first_index()) as usize;
                if n_durable > 0 {
                    let n = pick.index(n_durable) + 1;
                    let upto = model.entries[n - 1].log_id;
                    store.purge(upto).await?;
                    model.entries.drain(..n);
                    model.purged = Some(upto);
                }
            }
            Op::PurgeBeyond(ahead) => {
                let upto = log_id(model.term, model.next_index() - 1 + ahead);
                store.purge(upto).await?;
                model.entries.clear();
                model.purged = Some(upto);
                model.durable_index = model.durable_index.max(upto.index);
            }
            Op::Read(pick, bytes_max) => {
                if !model.entries.is_empty() {
                    let i = pick.index(model.entries.len());
                    let start = model.entries[i].log_id.index;
                    let got = store.get_log_reader().await.read(start, model.next_index(), bytes_max)?;
                    assert!(!got.is_empty(), "{ctx}: read nothing");
                    assert_eq!(got[..], model.entries[i..][..got.len()], "{ctx}: read the wrong entries");
                    let bytes: usize = got.iter().map(frame_bytes).sum();
                    let frame_max = model.entries.iter().map(frame_bytes).max().unwrap_or(0);
                    assert!(bytes <= bytes_max.max(1) + frame_max, "{ctx}: read {bytes} bytes");
                }
            }
            Op::Reopen => {
                // The old store's flusher keeps running until it has drained its queue, as a
                // process's I/O would; the callbacks stay pending until `Flush` or a crash.
                drop(store);
                let (reopened, report) = open(&disk, SEGMENT_BYTES).await?;
                assert_eq!(report.reason, None, "{ctx}: a reopen without a crash cuts nothing");
                store = reopened;
            }
            Op::Crash(tear) => {
                match tear {
                    None => disk.crash(None),
                    Some(t) => disk.crash(Some(&mut |n: usize| n * t as usize / 255)),
                }
                drop(store);
                drain(&mut pending).await;
                let (reopened, _) = open(&disk, SEGMENT_BYTES).await?;
                store = reopened;
                let state = store.get_log_state().await?;
                assert_eq!(state.last_purged_log_id, model.purged, "{ctx}: a purge is durable");
                let got = store.get_log_reader().await.try_get_log_entries(..).await?;
                assert!(got.len() <= model.entries.len(), "{ctx}: the log grew in a crash");
                assert_eq!(got[..], model.entries[..got.len()], "{ctx}: not a prefix of the log");
                model.entries.truncate(got.len());
                let last_index = model.last().map_or(0, |l| l.index);
                assert!(
                    last_index >= model.durable_index,
                    "{ctx}: lost entries up to {}",
                    model.durable_index
                );
                model.durable_index = last_index;
            }
        }
        assert_log(&mut store, model.purged, &model.entries, &ctx).await?;
    }
    drop(store);
    drain(&mut pending).await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random sequences of appends, flushes, truncations, purges, reads, reopens and crashes
    /// keep the log equal to the model: exactly its entries while running, and after a crash a
    /// prefix of them that holds every flushed entry.
    #[test]
    fn log_matches_model(ops in prop::collection::vec(op_strategy(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(run_model(ops))?;
    }
}

/// An append that meets a full disk, here in the middle of a batch that spans segments, writes
/// nothing: it waits, the log reads as before, and once space is freed the same append
/// completes and the log (and its recovery) holds every entry once. Before, openraft got the
/// error and stopped the group for good.
#[tokio::test(start_paused = true)]
async fn an_append_on_a_full_disk_waits_for_space_and_leaves_the_log_as_it_was() -> io::Result<()> {
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    let first = entries(1, 10);
    append_durable(&mut store, first.clone()).await?;
    // Room for about two more segments' worth, not for the whole next batch.
    disk.set_capacity(Some(disk.bytes() as u64 + 2 * SEGMENT_BYTES_SMALL));
    let second = entries(11, 60);
    let segments_before = store.reader().segments();
    let mut reader = store.reader();
    let blocked = tokio::spawn(async move {
        let rx = append(&mut store, second).await?;
        flushed(rx).await?;
        Ok::<_, io::Error>(store)
    });
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert!(!blocked.is_finished(), "the append waits while the disk is full");
    assert_eq!(reader.segments(), segments_before, "nothing of the batch is in the log");
    let read = reader.try_get_log_entries(1..100).await?;
    assert_eq!(read.len(), 10, "only the first batch reads back");
    disk.set_capacity(None);
    let mut store = blocked.await.map_err(io::Error::other)??;
    let all = entries(1, 60);
    assert_log(&mut store, None, &all, "after space was freed").await?;
    drop(store);
    disk.crash(None);
    let (mut store, report) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    assert_eq!(report.truncated_bytes, 0, "{report:?}");
    assert_log(&mut store, None, &all, "after recovery").await?;
    Ok(())
}

/// A failed sync is not retried and covers nothing: its callback fails, the failure is
/// reported once (the node stops on it), later appends fail too even once the disk syncs again,
/// and `wait_durable` never lets a state machine apply an entry the failed sync was to persist.
/// After the power loss the log holds what the last good sync did. Before, a state store could
/// persist an entry applied from the unsynced log; openraft then found the state ahead of the
/// log on restart and took it for a purge, discarding the whole log (simulator seed 12).
#[tokio::test(start_paused = true)]
async fn a_failed_sync_is_final_and_never_counts_as_durable() -> io::Result<()> {
    let disk = MemDisk::new();
    let reported = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let on_failure: eddy_raft::log::FailureObserver = {
        let reported = reported.clone();
        Arc::new(move |why: &str| reported.lock().expect("lock").push(why.to_owned()))
    };
    let config = LogConfig {
        segment_bytes_max: SEGMENT_BYTES_SMALL,
        on_failure: Some(on_failure),
        ..LogConfig::default()
    };
    let (mut store, _) = LogStore::open(Arc::new(disk.clone()), log_dir(), config).await?;
    let reader = store.reader();
    append_durable(&mut store, entries(1, 10)).await?;
    let wait = std::time::Duration::from_secs(5);
    assert!(tokio::time::timeout(wait, reader.wait_durable(10)).await.is_ok(), "synced entries are durable");

    disk.set_fsync_fails(true);
    let failed = append(&mut store, entries(11, 20)).await?;
    assert!(flushed(failed).await.is_err(), "the append whose sync failed fails");
    assert_eq!(reported.lock().expect("lock").len(), 1, "the failure is reported: {reported:?}");
    assert!(
        reported.lock().expect("lock")[0].contains("/group/log"),
        "the report names the log: {reported:?}"
    );
    assert!(tokio::time::timeout(wait, reader.wait_durable(11)).await.is_err(), "not durable");

    disk.set_fsync_fails(false);
    let later = append(&mut store, entries(21, 21)).await?;
    assert!(flushed(later).await.is_err(), "no retry: the log stays failed although syncs work again");
    assert!(tokio::time::timeout(wait, reader.wait_durable(11)).await.is_err(), "still not durable");

    drop(store);
    disk.crash(None);
    let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    assert_log(&mut store, None, &entries(1, 10), "after the power loss").await?;
    Ok(())
}

/// A truncation lowers what counts as durable: an entry rewritten at a truncated index is
/// durable only once its own sync completed.
#[tokio::test(start_paused = true)]
async fn a_truncation_lowers_what_counts_as_durable() -> io::Result<()> {
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk, SEGMENT_BYTES_SMALL).await?;
    let reader = store.reader();
    append_durable(&mut store, entries(1, 10)).await?;
    store.truncate_after(Some(log_id(2, 5))).await?;
    let wait = std::time::Duration::from_secs(5);
    assert!(tokio::time::timeout(wait, reader.wait_durable(5)).await.is_ok(), "what was kept stays durable");
    assert!(tokio::time::timeout(wait, reader.wait_durable(6)).await.is_err(), "6 was truncated");
    disk.set_fsync_fails(true);
    let rewritten = vec![entry(9, 6, 10)];
    let rx = append(&mut store, rewritten.clone()).await?;
    assert!(flushed(rx).await.is_err());
    assert!(tokio::time::timeout(wait, reader.wait_durable(6)).await.is_err(), "its sync failed");
    Ok(())
}
