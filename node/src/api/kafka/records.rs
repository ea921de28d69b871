//! Kafka record batches (format v2, "magic 2") in and out of Eddy's records.
//!
//! Eddy stores its own records (key, value, headers, timestamp; see `partition::command`), so a
//! produced batch is checked (CRC-32C, header fields, record count) and decoded into them, and a
//! fetch encodes the stored records into one uncompressed v2 batch per answer. The decision and
//! its cost are in ARCHITECTURE.md ("Kafka listener"). What does not survive the conversion:
//! a null value (stored as an empty one), a null header value (likewise), a repeated header key
//! (the codec keeps the last), and the producer's compression (batches of every Kafka codec are
//! accepted; fetches are uncompressed).

use bytes::Buf;
use bytes::Bytes;
use bytes::BytesMut;
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;
use kafka_protocol::records::Record;
use kafka_protocol::records::RecordBatchDecoder;
use kafka_protocol::records::RecordBatchEncoder;
use kafka_protocol::records::RecordEncodeOptions;
use kafka_protocol::records::TimestampType;

use crate::partition::handle::FetchedRecord;
use crate::service::data::NewRecord;

/// The fixed part of a v2 batch, up to and including its record count.
const BATCH_HEADER_BYTES: usize = 61;
/// Where the magic byte, the attributes and the record count sit in a batch.
const MAGIC_AT: usize = 16;
const ATTRIBUTES_AT: usize = 21;
const RECORD_COUNT_AT: usize = 57;
/// The least an uncompressed record takes: its length, attributes, timestamp and offset deltas,
/// key and value lengths, and header count, one byte each.
const RECORD_BYTES_MIN: usize = 7;

/// One produced batch, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedBatch {
    /// -1 for a producer without idempotence.
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records: Vec<NewRecord>,
}

/// Why a produce request's records were refused, with the Kafka error code to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    /// Not a well-formed v2 batch (Kafka's `CORRUPT_MESSAGE`).
    #[error("corrupt record batch: {0}")]
    Corrupt(String),
    /// A well-formed batch Eddy does not take (`UNSUPPORTED_FOR_MESSAGE_FORMAT`, or
    /// `UNSUPPORTED_COMPRESSION_TYPE` for a codec).
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    UnsupportedCompression(String),
    /// More records than a request may carry (`RECORD_LIST_TOO_LARGE`).
    #[error("{0}")]
    TooMany(String),
    /// A compressed batch that decompresses past the limit (`MESSAGE_TOO_LARGE`).
    #[error("{0}")]
    TooLarge(String),
}

impl RecordsError {
    pub fn code(&self) -> i16 {
        match self {
            RecordsError::Corrupt(_) => super::codes::CORRUPT_MESSAGE,
            RecordsError::Unsupported(_) => super::codes::UNSUPPORTED_FOR_MESSAGE_FORMAT,
            RecordsError::UnsupportedCompression(_) => super::codes::UNSUPPORTED_COMPRESSION_TYPE,
            RecordsError::TooMany(_) => super::codes::RECORD_LIST_TOO_LARGE,
            RecordsError::TooLarge(_) => super::codes::MESSAGE_TOO_LARGE,
        }
    }
}

/// Decodes the batches of one partition's produce data. Every header field the codec would
/// trust is checked first, so that no count or length from the wire sizes an allocation.
///
/// Compressed batches (gzip, snappy, lz4, zstd) are decompressed to at most `decompressed_max`
/// bytes each.
pub fn decode_produced(
    mut data: Bytes,
    max_records: usize,
    decompressed_max: usize,
) -> Result<Vec<ProducedBatch>, RecordsError> {
    let mut out = Vec::new();
    let mut total = 0usize;
    while data.has_remaining() {
        if data.len() < BATCH_HEADER_BYTES {
            return Err(RecordsError::Corrupt(format!(
                "{} bytes left, less than a batch header ({BATCH_HEADER_BYTES})",
                data.len()
            )));
        }
        let length = (&data[8..12]).get_i32();
        let Some(end) =
            usize::try_from(length).ok().and_then(|l| l.checked_add(12)).filter(|e| *e <= data.len())
        else {
            return Err(RecordsError::Corrupt(format!(
                "batch length {length} does not fit the {} bytes left",
                data.len()
            )));
        };
        if end < BATCH_HEADER_BYTES {
            return Err(RecordsError::Corrupt(format!("batch length {length} is shorter than its header")));
        }
        let magic = data[MAGIC_AT] as i8;
        if magic != 2 {
            return Err(RecordsError::Unsupported(format!(
                "record batch magic {magic}: only format v2 (magic 2, Kafka 0.11 and later) is accepted"
            )));
        }
        let attributes = (&data[ATTRIBUTES_AT..ATTRIBUTES_AT + 2]).get_i16();
        if attributes & (1 << 4) != 0 || attributes & (1 << 5) != 0 {
            return Err(RecordsError::Unsupported(
                "transactional and control batches are not supported (Eddy has no Kafka transactions)".into(),
            ));
        }
        let codec = match attributes & 0x7 {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Snappy,
            3 => Compression::Lz4,
            4 => Compression::Zstd,
            other => {
                return Err(RecordsError::UnsupportedCompression(format!(
                    "compression codec {other} does not exist"
                )));
            }
        };
        let count = (&data[RECORD_COUNT_AT..RECORD_COUNT_AT + 4]).get_i32();
        let body = end - BATCH_HEADER_BYTES;
        let Ok(count) = usize::try_from(count) else {
            return Err(RecordsError::Corrupt(format!("negative record count {count}")));
        };
        if count == 0 || count * RECORD_BYTES_MIN > body {
            return Err(RecordsError::Corrupt(format!(
                "record count {count} does not fit {body} bytes of records"
            )));
        }
        total += count;
        if total > max_records {
            return Err(RecordsError::TooMany(format!(
                "{total} records exceed the limit of {max_records} per partition in a request"
            )));
        }
        if codec == Compression::None {
            check_records(&data[BATCH_HEADER_BYTES..end], count)?;
        }
        let mut batch = data.split_to(end);
        // Compressed records are checked once decompressed (with a bound on their size), inside
        // the codec's decoding; the reason for a refusal comes back through `refused`.
        let refused = std::cell::RefCell::new(None);
        let decompress = |compressed: &mut Bytes, codec: Compression| -> anyhow::Result<Bytes> {
            let out = decompress(compressed, codec, decompressed_max)
                .and_then(|out| check_records(&out, count).map(|()| out))
                .inspect_err(|e| *refused.borrow_mut() = Some(e.clone()))?;
            Ok(out)
        };
        let set = RecordBatchDecoder::decode_with_custom_compression(&mut batch, Some(decompress))
            .map_err(|e| refused.take().unwrap_or_else(|| RecordsError::Corrupt(e.to_string())))?;
        if batch.has_remaining() {
            return Err(RecordsError::Corrupt("batch length disagrees with its records".into()));
        }
        let Some(first) = set.records.first() else {
            return Err(RecordsError::Corrupt("a batch without records".into()));
        };
        let (producer_id, producer_epoch, base_sequence) =
            (first.producer_id, first.producer_epoch, first.sequence);
        let records = set
            .records
            .into_iter()
            .map(|r| NewRecord {
                key: r.key,
                value: r.value.unwrap_or_default(),
                headers: r
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.unwrap_or_default()))
                    .collect(),
                timestamp_ms: (r.timestamp >= 0).then_some(r.timestamp),
            })
            .collect();
        out.push(ProducedBatch { producer_id, producer_epoch, base_sequence, records });
    }
    Ok(out)
}

/// Walks a batch's uncompressed records and checks that every length and count fits in the
/// bytes that follow it, so that decoding sizes nothing by an unchecked number (the codec
/// reserves room for a record's header count before reading the headers).
fn check_records(mut body: &[u8], count: usize) -> Result<(), RecordsError> {
    let corrupt = |i: usize, what: &str| RecordsError::Corrupt(format!("record {i}: {what}"));
    for i in 0..count {
        let len = varint(&mut body).ok_or_else(|| corrupt(i, "bad length"))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= body.len())
            .ok_or_else(|| corrupt(i, "length past the batch"))?;
        let (mut r, rest) = body.split_at(len);
        body = rest;
        if r.is_empty() {
            return Err(corrupt(i, "empty"));
        }
        r = &r[1..]; // attributes
        varint(&mut r).ok_or_else(|| corrupt(i, "bad timestamp delta"))?;
        varint(&mut r).ok_or_else(|| corrupt(i, "bad offset delta"))?;
        for what in ["key", "value"] {
            skip_bytes(&mut r).ok_or_else(|| corrupt(i, &format!("bad {what} length")))?;
        }
        let headers = varint(&mut r).ok_or_else(|| corrupt(i, "bad header count"))?;
        // A header takes at least two bytes (its key's and its value's lengths).
        let headers = usize::try_from(headers)
            .ok()
            .filter(|h| h.saturating_mul(2) <= r.len())
            .ok_or_else(|| corrupt(i, "header count past the record"))?;
        for _ in 0..headers {
            for what in ["header key", "header value"] {
                skip_bytes(&mut r).ok_or_else(|| corrupt(i, &format!("bad {what} length")))?;
            }
        }
        if !r.is_empty() {
            return Err(corrupt(i, "bytes past its last header"));
        }
    }
    if !body.is_empty() {
        return Err(RecordsError::Corrupt(format!("bytes past the {count} records the batch counts")));
    }
    Ok(())
}

/// A batch's records, decompressed, refused past `max` bytes. Each codec is read as a stream
/// bounded by `max`, or (snappy) its blocks' stated lengths are checked before anything is
/// allocated for them.
fn decompress(data: &[u8], codec: Compression, max: usize) -> Result<Bytes, RecordsError> {
    use std::io::Read;
    let bounded = |r: &mut dyn Read, what: &str| -> Result<Bytes, RecordsError> {
        let mut out = Vec::new();
        r.take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| RecordsError::Corrupt(format!("{what} records do not decompress: {e}")))?;
        if out.len() > max {
            return Err(RecordsError::TooLarge(format!(
                "{what} batch decompresses to more than {max} bytes"
            )));
        }
        Ok(Bytes::from(out))
    };
    match codec {
        Compression::None => Ok(Bytes::copy_from_slice(data)),
        Compression::Gzip => bounded(&mut flate2::read::GzDecoder::new(data), "gzip"),
        Compression::Lz4 => bounded(&mut lz4_flex::frame::FrameDecoder::new(data), "lz4"),
        Compression::Zstd => {
            let mut d = ruzstd::decoding::StreamingDecoder::new(data)
                .map_err(|e| RecordsError::Corrupt(format!("zstd records do not decompress: {e}")))?;
            bounded(&mut d, "zstd")
        }
        Compression::Snappy => snappy(data, max),
    }
}

/// Kafka's snappy: xerial's framing (a magic header, then blocks each with a 4-byte length), or
/// one raw snappy block from clients that do not frame.
fn snappy(data: &[u8], max: usize) -> Result<Bytes, RecordsError> {
    const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";
    const XERIAL_HEADER: usize = 16;
    let corrupt = |e: String| RecordsError::Corrupt(format!("snappy records do not decompress: {e}"));
    let mut out = Vec::new();
    let block = |b: &[u8], out: &mut Vec<u8>| -> Result<(), RecordsError> {
        let len = snap::raw::decompress_len(b).map_err(|e| corrupt(e.to_string()))?;
        if out.len().saturating_add(len) > max {
            return Err(RecordsError::TooLarge(format!(
                "snappy batch decompresses to more than {max} bytes"
            )));
        }
        let at = out.len();
        out.resize(at + len, 0);
        snap::raw::Decoder::new().decompress(b, &mut out[at..]).map_err(|e| corrupt(e.to_string()))?;
        Ok(())
    };
    if !data.starts_with(XERIAL_MAGIC) {
        block(data, &mut out)?;
        return Ok(Bytes::from(out));
    }
    let mut rest = data.get(XERIAL_HEADER..).ok_or_else(|| corrupt("a short xerial header".into()))?;
    while !rest.is_empty() {
        let (len, tail) = rest.split_at_checked(4).ok_or_else(|| corrupt("a short block length".into()))?;
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        let (b, tail) = tail.split_at_checked(len).ok_or_else(|| corrupt("a block past the data".into()))?;
        block(b, &mut out)?;
        rest = tail;
    }
    Ok(Bytes::from(out))
}

/// A zigzag varint (Kafka's record fields), as an `i64`.
fn varint(buf: &mut &[u8]) -> Option<i64> {
    let mut raw = 0u64;
    for shift in (0..70).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        raw |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    None
}

/// Skips a varint-length-prefixed byte string (-1 is null).
fn skip_bytes(buf: &mut &[u8]) -> Option<()> {
    match varint(buf)? {
        -1 => Some(()),
        n => {
            let n = usize::try_from(n).ok().filter(|n| *n <= buf.len())?;
            *buf = &buf[n..];
            Some(())
        }
    }
}

/// Encodes fetched records (consecutive offsets) as one uncompressed v2 batch.
pub fn encode_fetched(records: &[FetchedRecord], log_append_time: bool) -> Bytes {
    let Some(first) = records.first() else {
        return Bytes::new();
    };
    let base = first.offset;
    let timestamp_type = if log_append_time { TimestampType::LogAppend } else { TimestampType::Creation };
    let kafka: Vec<Record> = records
        .iter()
        .map(|r| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type,
            offset: r.offset as i64,
            // The codec starts a new batch where `offset - sequence` changes; one batch it is.
            sequence: (r.offset - base) as i32,
            timestamp: r.record.timestamp_ms,
            key: r.record.key.clone(),
            value: Some(r.record.value.clone()),
            headers: r
                .record
                .headers
                .iter()
                .map(|(k, v)| (StrBytes::from_string(k.clone()), Some(v.clone())))
                .collect::<IndexMap<_, _>>(),
        })
        .collect();
    let mut out = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut out,
        &kafka,
        &RecordEncodeOptions { version: 2, compression: Compression::None },
    )
    .expect("an uncompressed batch always encodes");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::command::StoredRecord;

    fn stored(offset: u64, key: &str, value: &str) -> FetchedRecord {
        FetchedRecord {
            offset,
            record: StoredRecord {
                key: Some(Bytes::from(key.to_owned())),
                value: Bytes::from(value.to_owned()),
                headers: vec![("h".into(), Bytes::from_static(b"v"))],
                timestamp_ms: 1_700_000_000_000 + offset as i64,
            },
        }
    }

    #[test]
    fn fetched_records_round_trip_through_a_v2_batch() {
        let records: Vec<_> = (40..45).map(|o| stored(o, &format!("k{o}"), &format!("v{o}"))).collect();
        let batch = encode_fetched(&records, false);
        let sets = RecordBatchDecoder::decode_all(&mut batch.clone()).expect("decodes");
        assert_eq!(sets.len(), 1, "one batch");
        let decoded = &sets[0].records;
        assert_eq!(decoded.len(), 5);
        for (d, r) in decoded.iter().zip(&records) {
            assert_eq!(d.offset, r.offset as i64);
            assert_eq!(d.key, r.record.key);
            assert_eq!(d.value.as_ref(), Some(&r.record.value));
            assert_eq!(d.timestamp, r.record.timestamp_ms);
            assert_eq!(d.headers.get(&StrBytes::from_static_str("h")), Some(&Some(Bytes::from_static(b"v"))));
        }
        // What a producer sends decodes into the same records.
        let produced = decode_produced(batch, 100, 1 << 20).expect("a valid batch");
        assert_eq!(produced.len(), 1);
        assert_eq!(produced[0].producer_id, -1);
        let keys: Vec<_> = produced[0].records.iter().map(|r| r.key.clone().expect("key")).collect();
        assert_eq!(keys[0], Bytes::from_static(b"k40"));
        assert_eq!(produced[0].records[4].timestamp_ms, Some(1_700_000_000_044));
    }

    #[test]
    fn bad_batches_are_refused_with_the_reason() {
        let good = encode_fetched(&[stored(0, "k", "v")], false);
        // A flipped byte in the records fails the CRC.
        let mut bad = good.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(decode_produced(Bytes::from(bad), 10, 1 << 20), Err(RecordsError::Corrupt(_))));
        // A record count no batch of this size can hold is refused before anything is sized by it.
        let mut huge = good.to_vec();
        huge[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            decode_produced(Bytes::from(huge), usize::MAX, 1 << 20),
            Err(RecordsError::Corrupt(_))
        ));
        // Too many records for the limit.
        let many: Vec<_> = (0..5).map(|o| stored(o, "k", "v")).collect();
        let e = decode_produced(encode_fetched(&many, false), 4, 1 << 20).expect_err("over the limit");
        assert_eq!(e.code(), super::super::codes::RECORD_LIST_TOO_LARGE);
        // Older message formats.
        let mut v1 = good.to_vec();
        v1[MAGIC_AT] = 1;
        assert!(matches!(decode_produced(Bytes::from(v1), 10, 1 << 20), Err(RecordsError::Unsupported(_))));
        // Truncated, and a length that runs past the data.
        assert!(decode_produced(good.slice(..good.len() - 1), 10, 1 << 20).is_err());
        assert!(decode_produced(good.slice(..30), 10, 1 << 20).is_err());
    }

    /// The records of `batch` compressed with `codec`, as a Kafka producer sends them.
    fn compress(records: &[u8], codec: Compression) -> Vec<u8> {
        use std::io::Write;
        match codec {
            Compression::None => records.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(records).expect("gzip");
                e.finish().expect("gzip")
            }
            Compression::Lz4 => {
                let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
                e.write_all(records).expect("lz4");
                e.finish().expect("lz4")
            }
            Compression::Zstd => {
                let mut out = Vec::new();
                ruzstd::encoding::compress(records, &mut out, ruzstd::encoding::CompressionLevel::Fastest);
                out
            }
            Compression::Snappy => {
                // xerial framing, as the Java client and librdkafka send it, in two blocks.
                let mut out = b"\x82SNAPPY\x00\0\0\0\x01\0\0\0\x01".to_vec();
                let (a, b) = records.split_at(records.len() / 2);
                for block in [a, b] {
                    let c = snap::raw::Encoder::new().compress_vec(block).expect("snappy");
                    out.extend_from_slice(&(c.len() as u32).to_be_bytes());
                    out.extend_from_slice(&c);
                }
                out
            }
        }
    }

    #[test]
    fn every_kafka_codec_decompresses_within_a_bound() {
        let records: Vec<_> = (0..50).map(|o| stored(o, &format!("key-{o}"), &"v".repeat(100))).collect();
        let plain = encode_fetched(&records, false);
        let body = &plain[BATCH_HEADER_BYTES..];
        for codec in
            [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd]
        {
            let compressed = compress(body, codec);
            let out = decompress(&compressed, codec, 1 << 20).unwrap_or_else(|e| panic!("{codec:?}: {e}"));
            assert_eq!(&out[..], body, "{codec:?}");
            check_records(&out, 50).expect("the records check out");
            // Past the bound: refused, whatever the codec.
            let e = decompress(&compressed, codec, body.len() - 1);
            if codec != Compression::None {
                assert!(matches!(e, Err(RecordsError::TooLarge(_))), "{codec:?}: {e:?}");
            }
        }
        // Raw snappy is read too; a block that claims a huge length is refused before anything
        // is allocated for it.
        let raw = snap::raw::Encoder::new().compress_vec(body).expect("snappy");
        assert_eq!(&decompress(&raw, Compression::Snappy, 1 << 20).expect("raw snappy")[..], body);
        let claims_4gib = [0xff, 0xff, 0xff, 0xff, 0x0f, 0];
        assert!(matches!(
            decompress(&claims_4gib, Compression::Snappy, 1 << 20),
            Err(RecordsError::TooLarge(_))
        ));
        // A gzip bomb (64 MiB of zeros) stops at the bound.
        let zeros = compress(&vec![0u8; 64 << 20], Compression::Gzip);
        assert!(matches!(decompress(&zeros, Compression::Gzip, 1 << 20), Err(RecordsError::TooLarge(_))));
        assert!(matches!(decompress(b"not gzip", Compression::Gzip, 1 << 20), Err(RecordsError::Corrupt(_))));
    }

    #[test]
    fn record_checks_bound_every_count_by_the_bytes_that_follow() {
        // One record: length 9, attributes, timestamp delta 0, offset delta 0, key -1 (null),
        // value of 1 byte, then a header count.
        let with_headers = |count: u8| vec![0x12, 0, 0, 0, 0x01, 0x02, b'v', count, 0, 0];
        check_records(&[0x0e, 0, 0, 0, 0x01, 0x02, b'v', 0], 1).expect("no headers");
        // A header count of 1,000,000 in a record with two bytes left.
        let mut huge = with_headers(0);
        huge.truncate(7);
        huge.extend_from_slice(&[0x80, 0x89, 0x7a, 0, 0]);
        huge[0] = 0x16;
        assert!(check_records(&huge, 1).is_err());
        assert!(check_records(&with_headers(2), 1).is_ok(), "a header with an empty key and value");
        assert!(check_records(&with_headers(4), 1).is_err(), "two headers do not fit");
        assert!(check_records(&[0x0e, 0, 0, 0, 0x01, 0x02, b'v', 0], 2).is_err(), "one record, not two");
        assert!(check_records(&[0x7f], 1).is_err(), "a length past the data");
    }
}
