//! How `eddyctl` prints records and results: JSON for scripts, tables for people.

use base64::Engine;
use eddy_proto::v1 as pb;
use serde_json::Value;
use serde_json::json;

/// Output format of a command.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// Puts `bytes` into `obj` as `name` (UTF-8 text) or `name_base64` (anything else).
fn put_bytes(obj: &mut serde_json::Map<String, Value>, name: &str, bytes: Option<&[u8]>) {
    match bytes {
        None => {
            obj.insert(name.to_owned(), Value::Null);
        }
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => {
                obj.insert(name.to_owned(), Value::String(s.to_owned()));
            }
            Err(_) => {
                obj.insert(
                    format!("{name}_base64"),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
                );
            }
        },
    }
}

/// One consumed record as a JSON object: `{"partition","offset","key","value",…}`.
pub fn record_json(partition: u32, r: &pb::FetchedRecord) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert("partition".into(), json!(partition));
    obj.insert("offset".into(), json!(r.offset));
    put_bytes(&mut obj, "key", r.key.as_deref());
    put_bytes(&mut obj, "value", Some(&r.value));
    obj.insert("timestamp_ms".into(), json!(r.timestamp_ms));
    if !r.headers.is_empty() {
        let mut headers = serde_json::Map::new();
        for h in &r.headers {
            put_bytes(&mut headers, &h.key, Some(&h.value));
        }
        obj.insert("headers".into(), Value::Object(headers));
    }
    Value::Object(obj)
}

pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(header.iter().map(|h| h.to_string()));
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_values_are_base64() {
        let r = pb::FetchedRecord {
            offset: 3,
            key: None,
            value: vec![0xff, 0x00].into(),
            headers: vec![],
            timestamp_ms: 1,
        };
        let v = record_json(1, &r);
        assert_eq!(v["key"], Value::Null);
        assert_eq!(v["value_base64"], "/wA=");
        assert!(v.get("value").is_none());
        let r = pb::FetchedRecord {
            offset: 4,
            key: Some("k".into()),
            value: "hello".into(),
            headers: vec![],
            timestamp_ms: 1,
        };
        let v = record_json(0, &r);
        assert_eq!(
            (v["key"].as_str(), v["value"].as_str(), v["offset"].as_u64()),
            (Some("k"), Some("hello"), Some(4))
        );
    }
}
