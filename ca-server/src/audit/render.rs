//! How an event is presented: the keys of DESIGN.md, times as RFC 3339. The CLI's formats and
//! the gRPC `AuditService` both present events through here.

use crate::store::EventRow;

pub use crate::rfc3339::{from_millis as rfc3339_ms, from_secs as rfc3339_secs};

/// The keys of DESIGN.md, in its order.
pub const KEYS: [&str; 25] = [
    "seq",
    "time",
    "kind",
    "spiffe_id",
    "namespace",
    "service_account",
    "pod_name",
    "pod_uid",
    "token_issuer",
    "serial",
    "not_before",
    "not_after",
    "authority_id",
    "public_key_sha256",
    "csr_sha256",
    "peer",
    "code",
    "reason",
    "count",
    "operator",
    "caller",
    "node",
    "requested",
    "hash",
    "prev_hash",
];

/// The values of an event, in the order of [`KEYS`].
pub fn values(e: &EventRow) -> [serde_json::Value; 25] {
    use serde_json::Value;
    let s = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    let i = |v: Option<i64>| v.map_or(Value::Null, Value::from);
    [
        Value::from(e.seq),
        rfc3339_ms(e.time_ms).map_or(Value::Null, Value::String),
        Value::String(e.kind.as_str().to_owned()),
        s(&e.spiffe_id),
        s(&e.namespace),
        s(&e.service_account),
        s(&e.pod_name),
        s(&e.pod_uid),
        s(&e.token_issuer),
        s(&e.serial),
        e.not_before
            .and_then(rfc3339_secs)
            .map_or(Value::Null, Value::String),
        e.not_after
            .and_then(rfc3339_secs)
            .map_or(Value::Null, Value::String),
        i(e.authority_id),
        s(&e.public_key_sha256),
        s(&e.csr_sha256),
        s(&e.peer),
        s(&e.code),
        s(&e.reason),
        i(e.count),
        s(&e.operator),
        s(&e.caller),
        s(&e.node),
        s(&e.requested),
        Value::String(e.hash.clone()),
        Value::String(e.prev_hash.clone()),
    ]
}

/// An event as one JSON object, keys in the order of [`KEYS`].
pub fn to_json(e: &EventRow) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        KEYS.iter().map(|k| k.to_string()).zip(values(e)).collect();
    serde_json::Value::Object(map).to_string()
}
