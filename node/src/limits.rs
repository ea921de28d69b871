//! Input limits and validation of client requests. Every bound is named and every violation is
//! an `INVALID_ARGUMENT` whose message names the field.

use serde::Deserialize;
use serde::Serialize;

use crate::error::BrokerError;
use crate::error::Result;

pub const TOPIC_NAME_BYTES_MAX: usize = 249;
pub const PARTITIONS_MAX: u32 = 10_000;
pub const REPLICATION_FACTOR_MAX: u32 = 5;
/// Produce timeouts are clamped to this.
pub const PRODUCE_TIMEOUT_MS_MAX: u32 = 60_000;
pub const PRODUCE_TIMEOUT_MS_DEFAULT: u32 = 10_000;
pub const FETCH_WAIT_MS_MAX: u32 = 30_000;
/// gRPC messages up to this size are decoded, so that oversized fields get a precise error.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// The largest request to `eddy.v1.Admin` and `eddy.v1.Groups`, which carry no events.
pub const CONTROL_MESSAGE_BYTES_MAX: usize = 4 << 20;
/// Bounds of a topic's `segment.bytes`.
pub const SEGMENT_BYTES_MIN: u64 = 16 << 10;
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;
/// The topic settings the broker understands.
pub const TOPIC_CONFIG_KEYS: &str =
    "max.event.bytes, retention.ms, retention.bytes, segment.bytes, timestamp.type";

/// Limits a node enforces on client requests (part of its config, reported in metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest record (key + value + headers), unless a topic sets `max.event.bytes`.
    pub max_event_bytes: u32,
    /// Most records in one produce request.
    pub max_batch_records: u32,
    /// Largest produce request (sum of its records).
    pub max_request_bytes: u32,
    /// Most bytes one fetch returns.
    pub max_fetch_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 1 << 20,
            max_batch_records: 10_000,
            max_request_bytes: 8 << 20,
            max_fetch_bytes: 8 << 20,
        }
    }
}

impl Limits {
    pub fn to_proto(&self) -> eddy_proto::v1::Limits {
        eddy_proto::v1::Limits {
            max_event_bytes: self.max_event_bytes,
            max_batch_records: self.max_batch_records,
            max_request_bytes: self.max_request_bytes,
            max_fetch_bytes: self.max_fetch_bytes,
        }
    }
}

fn invalid(msg: String) -> BrokerError {
    BrokerError::InvalidArgument(msg)
}

/// Topic names: `[A-Za-z0-9._-]{1,249}`, and not `.` or `..`.
pub fn validate_topic_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(invalid(format!("{field}: must not be empty")));
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(invalid(format!(
            "{field}: {} characters is too long; at most {TOPIC_NAME_BYTES_MAX} allowed",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(invalid(format!(
            "{field}: character {c:?} is not allowed; names match [A-Za-z0-9._-]{{1,249}}"
        )));
    }
    if name == "." || name == ".." {
        return Err(invalid(format!("{field}: \"{name}\" is not a valid topic name")));
    }
    Ok(())
}

/// A node's rack: 1 to 64 characters of `[A-Za-z0-9._-]`, so that it reads the same in a
/// config file, a metric label and a Kafka client's `client.rack`.
pub fn validate_rack(rack: &str) -> std::result::Result<(), String> {
    if rack.is_empty() || rack.len() > 64 {
        return Err(format!("{rack:?} must be 1 to 64 characters long"));
    }
    match rack.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => {
            Err(format!("character {c:?} in {rack:?} is not allowed; racks match [A-Za-z0-9._-]{{1,64}}"))
        }
        None => Ok(()),
    }
}

/// Topic config keys the broker understands, with their validation.
pub fn validate_topic_config(config: &std::collections::BTreeMap<String, String>) -> Result<()> {
    for (k, v) in config {
        match k.as_str() {
            "max.event.bytes" => {
                let n: u32 = v.parse().map_err(|_| {
                    invalid(format!("config.max.event.bytes: {v:?} is not a whole number of bytes"))
                })?;
                if n == 0 || n > 64 << 20 {
                    return Err(invalid(format!(
                        "config.max.event.bytes: {n} must be between 1 and {}",
                        64 << 20
                    )));
                }
            }
            "retention.ms" | "retention.bytes" => {
                let what = if k == "retention.ms" { "milliseconds" } else { "bytes" };
                match v.parse::<i64>() {
                    Ok(n) if n == -1 || n > 0 => {}
                    _ => {
                        return Err(invalid(format!(
                            "config.{k}: {v:?} must be a positive number of {what}, or -1 for no limit"
                        )));
                    }
                }
            }
            "segment.bytes" => match v.parse::<u64>() {
                Ok(n) if (SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&n) => {}
                _ => {
                    return Err(invalid(format!(
                        "config.segment.bytes: {v:?} must be a whole number of bytes between \
                         {SEGMENT_BYTES_MIN} and {SEGMENT_BYTES_MAX}"
                    )));
                }
            },
            "timestamp.type" => {
                if v != "create" && v != "log-append" {
                    return Err(invalid(format!(
                        "config.timestamp.type: {v:?} must be \"create\" (the producer's timestamp) or \
                         \"log-append\" (the leader's clock)"
                    )));
                }
            }
            other => {
                return Err(invalid(format!(
                    "config: unknown topic setting {other:?}; known: {TOPIC_CONFIG_KEYS}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, ok: bool) {
        assert_eq!(validate_topic_name("name", name).is_ok(), ok, "{name:?}");
    }

    #[test]
    fn topic_names() {
        check("orders", true);
        check("a.b_c-D9", true);
        check(&"x".repeat(249), true);
        check(&"x".repeat(250), false);
        check(&"x".repeat(300), false);
        check("", false);
        check("a/b", false);
        check("a b", false);
        check("é", false);
        check(".", false);
        check("..", false);
        let e = validate_topic_name("name", "a/b").unwrap_err().to_string();
        assert!(e.starts_with("name:") && e.contains("'/'"), "{e}");
    }

    /// `Ok` or the key the error names.
    fn config(k: &str, v: &str) -> Result<(), String> {
        let m = std::collections::BTreeMap::from([(k.to_owned(), v.to_owned())]);
        validate_topic_config(&m).map_err(|e| {
            let msg = e.to_string();
            assert!(matches!(e, BrokerError::InvalidArgument(_)), "{msg}");
            msg
        })
    }

    #[test]
    fn topic_configs_are_validated_naming_the_key() {
        for (k, v) in [
            ("retention.ms", "5000"),
            ("retention.ms", "-1"),
            ("retention.bytes", "1048576"),
            ("retention.bytes", "-1"),
            ("segment.bytes", "65536"),
            ("segment.bytes", "16384"),
            ("timestamp.type", "create"),
            ("timestamp.type", "log-append"),
            ("max.event.bytes", "1024"),
        ] {
            assert_eq!(config(k, v), Ok(()), "{k}={v}");
        }
        for (k, v) in [
            ("retention.ms", "0"),
            ("retention.ms", "-2"),
            ("retention.ms", "5s"),
            ("retention.bytes", "0"),
            ("retention.bytes", "lots"),
            ("segment.bytes", "1024"),
            ("segment.bytes", "2147483648"),
            ("segment.bytes", "-1"),
            ("timestamp.type", "CreateTime"),
            ("max.event.bytes", "0"),
        ] {
            let e = config(k, v).expect_err(&format!("{k}={v} must be refused"));
            assert!(e.starts_with(&format!("config.{k}: ")), "{k}={v}: {e}");
        }
        let e = config("retention.hours", "1").expect_err("unknown key");
        assert!(e.contains("retention.hours") && e.contains("retention.ms"), "{e}");
    }
}
