//! [`OffsetSpec`]: which offset of a partition to look up (`ListOffsets`), and how people
//! write one on a command line: `earliest`, `latest`, or an RFC 3339 time.

use eddy_proto::v1 as pb;

use crate::error::ClientError;
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The high watermark: the offset the next record gets.
    Latest,
    /// The first offset whose record timestamp is at or after this many milliseconds since the
    /// Unix epoch (the high watermark if there is none).
    Timestamp(i64),
}

impl OffsetSpec {
    /// `earliest`, `latest`, or an RFC 3339 time such as `2025-03-01T12:00:00Z` or
    /// `2025-03-01T13:00:00.250+01:00`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "earliest" => Ok(Self::Earliest),
            "latest" => Ok(Self::Latest),
            _ => parse_time_ms(s).map(Self::Timestamp),
        }
    }

    /// The request fields `spec` and `timestamp_ms`.
    pub fn to_proto(self) -> (pb::OffsetSpec, i64) {
        match self {
            Self::Earliest => (pb::OffsetSpec::Earliest, 0),
            Self::Latest => (pb::OffsetSpec::Latest, 0),
            Self::Timestamp(ts) => (pb::OffsetSpec::Timestamp, ts),
        }
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 time.
pub fn parse_time_ms(s: &str) -> Result<i64> {
    chrono::DateTime::parse_from_rfc3339(s).map(|t| t.timestamp_millis()).map_err(|e| {
        ClientError::Invalid(format!(
            "{s:?} is not an RFC 3339 time like 2025-03-01T12:00:00Z or 2025-03-01T13:00:00.250+01:00 ({e})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(OffsetSpec::parse("earliest").ok(), Some(OffsetSpec::Earliest));
        assert_eq!(OffsetSpec::parse("latest").ok(), Some(OffsetSpec::Latest));
        assert_eq!(OffsetSpec::parse("1970-01-01T00:00:01Z").ok(), Some(OffsetSpec::Timestamp(1000)));
        assert_eq!(
            OffsetSpec::parse("2025-03-01T13:00:00.250+01:00").ok(),
            Some(OffsetSpec::Timestamp(1_740_830_400_250))
        );
        assert_eq!(OffsetSpec::parse("1969-12-31T23:59:59Z").ok(), Some(OffsetSpec::Timestamp(-1000)));
        for bad in ["", "yesterday", "2025-03-01", "2025-03-01 12:00:00", "1700000000000"] {
            let e = OffsetSpec::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("RFC 3339"), "{bad:?}: {e}");
        }
    }
}
