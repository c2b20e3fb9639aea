//! How an event is presented: the keys of DESIGN.md, times as RFC 3339. The CLI's formats and
//! the gRPC `AuditService` both present events through here.

use super::event::{EventRow, FIELDS, FieldValue, Shown};

pub use crate::rfc3339::{from_millis as rfc3339_ms, from_secs as rfc3339_secs};

/// The keys of DESIGN.md, in its order: `seq`, `time`, `kind`, every field of [`FIELDS`],
/// `hash`, `prev_hash`.
pub static KEYS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    let mut keys = vec!["seq", "time", "kind"];
    keys.extend(FIELDS.iter().map(|f| f.name));
    keys.extend(["hash", "prev_hash"]);
    keys
});

/// The values of an event, in the order of [`KEYS`].
pub fn values(e: &EventRow) -> Vec<serde_json::Value> {
    use serde_json::Value;
    let text = |v: Option<String>| v.map_or(Value::Null, Value::String);
    let mut values = Vec::with_capacity(KEYS.len());
    values.push(Value::from(e.seq));
    values.push(text(rfc3339_ms(e.time_ms)));
    values.push(Value::from(e.kind.as_str()));
    for (field, value) in FIELDS.iter().zip(e.values()) {
        values.push(match (value, field.shown) {
            (FieldValue::Text(v), _) => text(v.map(str::to_owned)),
            (FieldValue::Int(v), Shown::UnixSecs) => text(v.and_then(rfc3339_secs)),
            (FieldValue::Int(v), Shown::AsIs) => v.map_or(Value::Null, Value::from),
        });
    }
    values.push(Value::String(e.hash.clone()));
    values.push(Value::String(e.prev_hash.clone()));
    values
}

/// An event as one JSON object, keys in the order of [`KEYS`].
pub fn to_json(e: &EventRow) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        KEYS.iter().map(|k| k.to_string()).zip(values(e)).collect();
    serde_json::Value::Object(map).to_string()
}
