//! The on-disk (and in-memory) encoding of one Raft log entry.
//!
//! ```text
//! +-----------+-----------+----------+-----------+---------+----------------+
//! | body_len  | crc32c    | term     | index     | kind    | payload        |
//! | u32 LE    | u32 LE    | u64 LE   | u64 LE    | u8      | body_len - 17  |
//! +-----------+-----------+----------+-----------+---------+----------------+
//!              \___ crc32c of everything after it (the body) ___/
//! ```
//!
//! The `kind` byte's low four bits are 0 for a blank entry, 1 for application data (the payload
//! is the opaque command), 2 for a membership change (postcard-encoded `Membership`); its high
//! four bits are the frame format's version, [`FRAME_VERSION`] (0: every frame written so far).
//! A build reads every version up to its own and refuses a newer one by name (never as damage,
//! never cut as a torn tail), so a format change bumps the version and keeps reading the older
//! ones. The CRC is computed when the frame is written and checked on every read.

use bytes::Bytes;

use crate::types::Entry;
use crate::types::EntryPayload;
use crate::types::Membership;
use crate::types::Payload;
use crate::types::log_id;
use crate::types::log_term;

/// Bytes before the body: `body_len` and `crc32c`.
pub const HEADER_BYTES: usize = 8;
/// Fixed part of the body: term, index, kind.
const BODY_FIXED_BYTES: usize = 17;
/// No entry body is larger; a length above it marks a corrupt frame.
pub const BODY_BYTES_MAX: usize = 128 << 20;

const KIND_BLANK: u8 = 0;
const KIND_NORMAL: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;
/// The frame format this build writes, in the high four bits of the `kind` byte.
pub const FRAME_VERSION: u8 = 0;
const VERSION_SHIFT: u8 = 4;
const KIND_MASK: u8 = 0x0f;

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the frame needs: a torn write at the end of a file.
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// The bytes are there but wrong: bad length, checksum or contents.
    #[error("corrupt frame: {0}")]
    Corrupt(String),
    /// An intact frame of a format newer than this build reads: a newer Eddy wrote it.
    #[error(
        "entry written by a newer Eddy: frame format version {version}, this build reads up to version {FRAME_VERSION}; run the newer build (a downgrade is not supported)"
    )]
    Newer { version: u8 },
}

/// Appends the frame of `entry` to `out`.
pub fn encode(entry: &Entry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    out.extend_from_slice(&log_term(&entry.log_id).to_le_bytes());
    out.extend_from_slice(&entry.log_id.index.to_le_bytes());
    match &entry.payload {
        EntryPayload::Blank => out.push(KIND_BLANK | FRAME_VERSION << VERSION_SHIFT),
        EntryPayload::Normal(p) => {
            out.push(KIND_NORMAL | FRAME_VERSION << VERSION_SHIFT);
            out.extend_from_slice(&p.0);
        }
        EntryPayload::Membership(m) => {
            out.push(KIND_MEMBERSHIP | FRAME_VERSION << VERSION_SHIFT);
            let encoded = postcard::to_stdvec(m).expect("a membership always encodes");
            out.extend_from_slice(&encoded);
        }
    }
    let body_len = out.len() - start - HEADER_BYTES;
    assert!(body_len <= BODY_BYTES_MAX, "entry body of {body_len} bytes exceeds BODY_BYTES_MAX");
    let crc = crc32c::crc32c(&out[start + HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Length of the frame at the start of `buf`, from its header alone.
pub fn frame_len(buf: &[u8]) -> Result<usize, FrameError> {
    if buf.len() < HEADER_BYTES {
        return Err(FrameError::Truncated { need: HEADER_BYTES, have: buf.len() });
    }
    let body_len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if !(BODY_FIXED_BYTES..=BODY_BYTES_MAX).contains(&body_len) {
        return Err(FrameError::Corrupt(format!("body length {body_len} out of range")));
    }
    Ok(HEADER_BYTES + body_len)
}

/// Decodes the frame at the start of `buf`; returns the entry and the frame's length. The
/// payload of a data entry shares `buf`'s memory.
pub fn decode(buf: &Bytes) -> Result<(Entry, usize), FrameError> {
    decode_verified(buf, true)
}

/// [`decode`], checking the CRC only with `verify` (off only for the simulator's planted bug
/// `corrupt-record-served`).
pub fn decode_verified(buf: &Bytes, verify: bool) -> Result<(Entry, usize), FrameError> {
    let len = frame_len(buf)?;
    if buf.len() < len {
        return Err(FrameError::Truncated { need: len, have: buf.len() });
    }
    let stored_crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let body = &buf[HEADER_BYTES..len];
    let crc = if verify { crc32c::crc32c(body) } else { stored_crc };
    if crc != stored_crc {
        return Err(FrameError::Corrupt(format!("crc32c {crc:#010x} != stored {stored_crc:#010x}")));
    }
    let term = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
    let index = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let version = body[16] >> VERSION_SHIFT;
    if version > FRAME_VERSION {
        return Err(FrameError::Newer { version });
    }
    let payload = match body[16] & KIND_MASK {
        KIND_BLANK if body.len() == BODY_FIXED_BYTES => EntryPayload::Blank,
        KIND_NORMAL => EntryPayload::Normal(Payload(buf.slice(HEADER_BYTES + BODY_FIXED_BYTES..len))),
        KIND_MEMBERSHIP => {
            let m: Membership = postcard::from_bytes(&body[BODY_FIXED_BYTES..])
                .map_err(|e| FrameError::Corrupt(format!("membership: {e}")))?;
            EntryPayload::Membership(m)
        }
        k => return Err(FrameError::Corrupt(format!("unknown entry kind {k}"))),
    };
    Ok((Entry { log_id: log_id(term, index), payload }, len))
}

/// Entries a bad frame could be followed by: an intact frame this far past it shows the bad one
/// is damage inside the log, not a torn tail.
const INTACT_SEARCH_ENTRIES: u64 = 1 << 32;

/// Bytes a frame's header and fixed body take: what [`plausible_after`] looks at.
pub const FIXED_BYTES: usize = HEADER_BYTES + BODY_FIXED_BYTES;

/// Whether the bytes at the start of `at` (at least [`FIXED_BYTES`]) could begin a frame with an
/// index above `after` (and not absurdly far above it): its length if so. A search for intact
/// frames after a bad one checks this before it spends a checksum, so random bytes almost
/// never cost one; a frame then counts as intact only if its CRC matches too.
pub fn plausible_after(at: &[u8], after: u64) -> Option<usize> {
    let index = u64::from_le_bytes(at.get(16..24)?.try_into().expect("8 bytes"));
    (index > after && index - after <= INTACT_SEARCH_ENTRIES && *at.get(24)? & KIND_MASK <= KIND_MEMBERSHIP)
        .then(|| frame_len(at).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::collections::BTreeSet;

    use super::*;
    use crate::types::NodeAddr;

    pub(crate) fn sample_entries() -> Vec<Entry> {
        let nodes: BTreeMap<u64, NodeAddr> = (1..=3)
            .map(|i| (i, NodeAddr { raft_addr: format!("r{i}"), client_addr: format!("c{i}") }))
            .collect();
        let m = Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes).expect("valid membership");
        vec![
            Entry { log_id: log_id(1, 1), payload: EntryPayload::Membership(m) },
            Entry { log_id: log_id(1, 2), payload: EntryPayload::Blank },
            Entry {
                log_id: log_id(2, 3),
                payload: EntryPayload::Normal(Payload(Bytes::from_static(b"hello"))),
            },
            Entry { log_id: log_id(2, 4), payload: EntryPayload::Normal(Payload(Bytes::new())) },
        ]
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let entries = sample_entries();
        for e in &entries {
            encode(e, &mut buf);
        }
        let mut buf = Bytes::from(buf);
        for e in &entries {
            let (got, len) = decode(&buf).expect("decodes");
            assert_eq!(&got, e);
            buf = buf.slice(len..);
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn a_frame_of_a_newer_format_is_refused_by_name_and_this_format_is_version_0() {
        let mut buf = Vec::new();
        encode(&sample_entries()[2], &mut buf);
        // Every frame written so far, this build's included, is version 0: kind byte = kind.
        assert_eq!(buf[HEADER_BYTES + 16], KIND_NORMAL);
        // The same frame as a newer format would write it (its CRC made right).
        buf[HEADER_BYTES + 16] |= 1 << VERSION_SHIFT;
        let crc = crc32c::crc32c(&buf[HEADER_BYTES..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        let err = decode(&Bytes::from(buf)).expect_err("a newer format");
        assert_eq!(err, FrameError::Newer { version: 1 });
        assert!(err.to_string().contains("newer Eddy"), "{err}");
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_detected() {
        let mut buf = Vec::new();
        encode(&sample_entries()[2], &mut buf);
        for cut in 0..buf.len() {
            assert!(
                matches!(decode(&Bytes::copy_from_slice(&buf[..cut])), Err(FrameError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode(&Bytes::from(bad)).is_err(), "flipped byte {i}");
        }
    }
}
