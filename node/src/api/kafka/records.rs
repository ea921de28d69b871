//! Kafka record batches (format v2, "magic 2") in and out of Eddy's records.
//!
//! Eddy stores its own records (key, value, headers, timestamp; see `partition::command`), so a
//! produced batch is checked (CRC-32C, header fields, record count) and decoded into them, and a
//! fetch encodes the stored records into one uncompressed v2 batch per answer. The decision and
//! its cost are in ARCHITECTURE.md ("Kafka listener"). What does not survive the conversion:
//! a null value (stored as an empty one), a null header value (likewise), a repeated header key
//! (the codec keeps the last), and the producer's compression (fetches are uncompressed).

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
}

impl RecordsError {
    pub fn code(&self) -> i16 {
        match self {
            RecordsError::Corrupt(_) => super::codes::CORRUPT_MESSAGE,
            RecordsError::Unsupported(_) => super::codes::UNSUPPORTED_FOR_MESSAGE_FORMAT,
            RecordsError::UnsupportedCompression(_) => super::codes::UNSUPPORTED_COMPRESSION_TYPE,
            RecordsError::TooMany(_) => super::codes::RECORD_LIST_TOO_LARGE,
        }
    }
}

/// Decodes the batches of one partition's produce data. Every header field the codec would
/// trust is checked first, so that no count or length from the wire sizes an allocation.
pub fn decode_produced(mut data: Bytes, max_records: usize) -> Result<Vec<ProducedBatch>, RecordsError> {
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
        let compressed = attributes & 0x7 != 0;
        if compressed {
            return Err(RecordsError::UnsupportedCompression(format!(
                "compression codec {} is not supported yet; produce uncompressed batches \
                 (compression.type=none)",
                attributes & 0x7
            )));
        }
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
        check_records(&data[BATCH_HEADER_BYTES..end], count)?;
        let mut batch = data.split_to(end);
        let set = RecordBatchDecoder::decode(&mut batch).map_err(|e| RecordsError::Corrupt(e.to_string()))?;
        if set.compression != Compression::None || batch.has_remaining() {
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
        let produced = decode_produced(batch, 100).expect("a valid batch");
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
        assert!(matches!(decode_produced(Bytes::from(bad), 10), Err(RecordsError::Corrupt(_))));
        // A record count no batch of this size can hold is refused before anything is sized by it.
        let mut huge = good.to_vec();
        huge[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(decode_produced(Bytes::from(huge), usize::MAX), Err(RecordsError::Corrupt(_))));
        // Too many records for the limit.
        let many: Vec<_> = (0..5).map(|o| stored(o, "k", "v")).collect();
        let e = decode_produced(encode_fetched(&many, false), 4).expect_err("over the limit");
        assert_eq!(e.code(), super::super::codes::RECORD_LIST_TOO_LARGE);
        // Older message formats.
        let mut v1 = good.to_vec();
        v1[MAGIC_AT] = 1;
        assert!(matches!(decode_produced(Bytes::from(v1), 10), Err(RecordsError::Unsupported(_))));
        // Truncated, and a length that runs past the data.
        assert!(decode_produced(good.slice(..good.len() - 1), 10).is_err());
        assert!(decode_produced(good.slice(..30), 10).is_err());
    }
}
