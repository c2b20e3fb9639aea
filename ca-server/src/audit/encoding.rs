//! The canonical encoding of an event, the bytes its hash covers, written out by hand so that
//! nothing but this file decides them (no serializer's field order, no error to swallow).
//!
//! Version 1, the only one so far, is compact JSON: one object, keys in the order `seq`,
//! `time_ms`, `kind`, then [`FIELDS`]; an empty field is `null`, except the ones added after
//! the first schema ([`Encoded::WhenSet`]), which are left out. Strings are escaped as JSON
//! requires and no further: `"` and `\` with a backslash; `\b \t \n \f \r` short; every other
//! control character below U+0020 as `\u00xx` (lowercase hex); everything else, U+007F and
//! non-ASCII included, as its UTF-8 bytes. `prev_hash` and `hash` are not encoded. A later
//! version would come with a column saying which version each row was written with; until
//! there is one, every row is version 1.

use sha2::{Digest, Sha256};

use super::event::{Encoded, EventRow, FIELDS, FieldValue};

/// The encodings there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Compact JSON, as described above.
    V1,
}

/// The encoding events are written with.
pub const CURRENT: Version = Version::V1;

/// The `prev_hash` of the first event of a log.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The bytes of `event` in `version`.
pub fn encode(event: &EventRow, version: Version) -> Vec<u8> {
    match version {
        Version::V1 => v1(event),
    }
}

/// `hex(SHA-256(prev_hash as hex text || "\n" || encoding))`: each event's hash covers the
/// previous event's hash and its own contents.
pub fn event_hash(event: &EventRow) -> String {
    let mut hasher = Sha256::new();
    hasher.update(event.prev_hash.as_bytes());
    hasher.update(b"\n");
    hasher.update(encode(event, CURRENT));
    hex::encode(hasher.finalize())
}

fn v1(event: &EventRow) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(
        format!("{{\"seq\":{},\"time_ms\":{}", event.seq, event.time_ms).as_bytes(),
    );
    out.extend_from_slice(b",\"kind\":");
    string(&mut out, event.kind.as_str());
    for (field, value) in FIELDS.iter().zip(event.values()) {
        if field.encoded == Encoded::WhenSet && value.is_none() {
            continue;
        }
        out.extend_from_slice(b",\"");
        out.extend_from_slice(field.name.as_bytes());
        out.extend_from_slice(b"\":");
        match value {
            FieldValue::Text(Some(s)) => string(&mut out, s),
            FieldValue::Int(Some(n)) => out.extend_from_slice(n.to_string().as_bytes()),
            FieldValue::Text(None) | FieldValue::Int(None) => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
    out
}

/// `s` as a JSON string, escaped as the module says.
fn string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0x0f)]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::EventKind;

    fn event() -> EventRow {
        let mut e = EventRow::new(EventKind::Issued);
        e.seq = 7;
        e.time_ms = 1_800_000_000_000;
        e.spiffe_id = Some("spiffe://cluster.local/ns/shop/sa/web".into());
        e.serial = Some("ab".into());
        e.prev_hash = GENESIS_HASH.into();
        e
    }

    /// The encoding every event had before `caller` and `node` existed: their hashes, already
    /// in logs, must still verify.
    const BEFORE: &str = concat!(
        r#"{"seq":7,"time_ms":1800000000000,"kind":"issued","#,
        r#""spiffe_id":"spiffe://cluster.local/ns/shop/sa/web","namespace":null,"#,
        r#""service_account":null,"pod_name":null,"pod_uid":null,"token_issuer":null,"#,
        r#""serial":"ab","not_before":null,"not_after":null,"authority_id":null,"#,
        r#""public_key_sha256":null,"csr_sha256":null,"peer":null,"code":null,"#,
        r#""reason":null,"count":null,"operator":null}"#
    );

    #[test]
    fn fields_added_later_leave_older_events_encoded_as_they_were() {
        let e = event();
        assert_eq!(String::from_utf8(encode(&e, Version::V1)).unwrap(), BEFORE);
        // The regression vector: this event's hash, as logs written by every earlier version
        // hold it.
        assert_eq!(
            event_hash(&e),
            "27da7108b8a500a2cbbfff66015f78ac4c69f51ed1bd5876b96e2f8e4d15189d"
        );

        // Set, they are encoded (and so hashed) after every older field.
        let mut ambient = event();
        ambient.caller = Some("spiffe://cluster.local/ns/istio-system/sa/ztunnel".into());
        ambient.node = Some("node-a".into());
        let text = String::from_utf8(encode(&ambient, Version::V1)).unwrap();
        assert_eq!(
            text,
            format!(
                "{},\"caller\":\"spiffe://cluster.local/ns/istio-system/sa/ztunnel\",\
                 \"node\":\"node-a\"}}",
                BEFORE.trim_end_matches('}')
            )
        );
        assert_ne!(event_hash(&ambient), event_hash(&e));
    }

    #[test]
    fn strings_are_escaped_as_json_and_no_further() {
        let mut e = event();
        e.reason = Some("a\"b\\c\u{8}\t\n\u{c}\r\u{1}\u{1f}\u{7f}é/✓".into());
        let text = String::from_utf8(encode(&e, Version::V1)).unwrap();
        assert!(
            text.contains(r#""reason":"a\"b\\c\b\t\n\f\r\u0001\u001f"#),
            "{text}"
        );
        assert!(text.contains("\u{7f}é/✓\""), "{text}");
        // It is JSON, and reads back to the same text.
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["reason"].as_str(), e.reason.as_deref());
    }

    #[test]
    fn the_encoding_is_the_one_a_json_serializer_gives_for_every_byte() {
        // Every character class, against serde_json's compact output of the same string.
        let all: String = (0u32..0x250).filter_map(char::from_u32).collect();
        let mut out = Vec::new();
        string(&mut out, &all);
        assert_eq!(out, serde_json::to_vec(&all).unwrap());
    }
}
