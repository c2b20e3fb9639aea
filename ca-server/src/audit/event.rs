//! The audit event, defined once. The table at the bottom of this file ([`audit_event!`]) is
//! the only list of its fields: the struct, [`FIELDS`] (which the store's columns, the
//! canonical encoding and the presented keys are all read from), [`EventRow::new`] and the
//! row mapping come out of it. A new field is one line there, a migration adding its column
//! (both dialects), and its proto field; see ARCHITECTURE.md.

use std::fmt;
use std::str::FromStr;

/// What kind of decision an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A certificate was issued.
    Issued,
    /// A request was refused.
    Denied,
    /// An authority changed state.
    Authority,
    /// The start of a pruned log: records the hash the chain continues from.
    Anchor,
    /// A retention prune (chained like any other event).
    Prune,
}

impl EventKind {
    /// Every kind, in the order they are documented.
    pub const ALL: [Self; 5] = [
        Self::Issued,
        Self::Denied,
        Self::Authority,
        Self::Anchor,
        Self::Prune,
    ];

    /// The kinds a filter may ask for (an anchor is the log's start, not a decision).
    pub const LISTED: [Self; 4] = [Self::Issued, Self::Denied, Self::Authority, Self::Prune];

    /// What the kind records, in words.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Issued => "Certificates issued",
            Self::Denied => "Requests refused",
            Self::Authority => "Authority changes",
            Self::Anchor => "The start of a pruned log",
            Self::Prune => "Retention prunes",
        }
    }

    /// The name stored, hashed and shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Denied => "denied",
            Self::Authority => "authority",
            Self::Anchor => "anchor",
            Self::Prune => "prune",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind name that is not one of [`EventKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event kind {0:?} (expected issued, denied, authority, anchor or prune)")]
pub struct UnknownKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(crate::untrusted::claim(s)))
    }
}

/// The type of an optional field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// Text (`TEXT`).
    Text,
    /// An integer (`BIGINT`).
    Int,
}

/// How a field is presented (`audit list`, the gRPC service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// As stored.
    AsIs,
    /// Unix seconds, shown as RFC 3339.
    UnixSecs,
}

/// Whether the canonical encoding names a field that is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded {
    /// Always: `null` when empty (the fields of the first schema).
    Always,
    /// Only when set: a field added later, so that events written before it encode, and
    /// hash, exactly as they did.
    WhenSet,
}

/// One optional field of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Its name: the struct field, the column, the key in the encoding and in `audit list`.
    pub name: &'static str,
    /// Its type.
    pub ty: FieldType,
    /// How it is presented.
    pub shown: Shown,
    /// How the canonical encoding treats it when empty.
    pub encoded: Encoded,
}

/// The value of an optional field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValue<'a> {
    /// A text field.
    Text(Option<&'a str>),
    /// An integer field.
    Int(Option<i64>),
}

impl FieldValue<'_> {
    /// Whether the field is empty.
    pub fn is_none(&self) -> bool {
        matches!(self, Self::Text(None) | Self::Int(None))
    }
}

/// Reads an event's optional fields from wherever it is stored ([`EventRow::read`]).
pub trait FieldReader {
    /// What a failed read is.
    type Error;
    /// Text field `name`.
    fn text(&mut self, name: &'static str) -> Result<Option<String>, Self::Error>;
    /// Integer field `name`.
    fn int(&mut self, name: &'static str) -> Result<Option<i64>, Self::Error>;
}

macro_rules! field_type {
    (Text) => {
        String
    };
    (Int) => {
        i64
    };
}

macro_rules! field_value {
    (Text, $v:expr) => {
        FieldValue::Text($v.as_deref())
    };
    (Int, $v:expr) => {
        FieldValue::Int($v)
    };
}

macro_rules! read_field {
    (Text, $reader:expr, $name:expr) => {
        $reader.text($name)?
    };
    (Int, $reader:expr, $name:expr) => {
        $reader.int($name)?
    };
}

/// Declares [`EventRow`] and everything read from its field list.
macro_rules! audit_event {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ident, $shown:ident, $encoded:ident;
    )*) => {
        /// One audit event. Besides its place in the chain (`seq`, `prev_hash`, `hash`), its
        /// time and its kind, every field is optional and listed in [`FIELDS`].
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct EventRow {
            /// Position in the log, from 1.
            pub seq: i64,
            /// When the decision was made, unix milliseconds.
            pub time_ms: i64,
            /// What kind of decision.
            pub kind: EventKind,
            $(
                $(#[doc = $doc])*
                pub $field: Option<field_type!($ty)>,
            )*
            /// The hash of the previous event (or of the anchor), hex.
            pub prev_hash: String,
            /// SHA-256 over `prev_hash` and this event's canonical encoding, hex.
            pub hash: String,
        }

        /// The optional fields, in their one order: of the columns, the canonical encoding
        /// and the presented keys.
        pub const FIELDS: &[Field] = &[$(
            Field {
                name: stringify!($field),
                ty: FieldType::$ty,
                shown: Shown::$shown,
                encoded: Encoded::$encoded,
            },
        )*];

        impl EventRow {
            /// An event of `kind` made now, every optional field empty; the log fills in
            /// `seq` and the hashes when it commits.
            pub fn new(kind: EventKind) -> Self {
                Self {
                    seq: 0,
                    time_ms: crate::rfc3339::now_unix_ms(),
                    kind,
                    $($field: None,)*
                    prev_hash: String::new(),
                    hash: String::new(),
                }
            }

            /// The optional fields' values, in the order of [`FIELDS`].
            pub fn values(&self) -> [FieldValue<'_>; FIELDS.len()] {
                [$(field_value!($ty, self.$field),)*]
            }

            /// An event with these fixed parts and its optional fields read from `reader`.
            pub fn read<R: FieldReader>(
                seq: i64,
                time_ms: i64,
                kind: EventKind,
                reader: &mut R,
            ) -> Result<Self, R::Error> {
                Ok(Self {
                    seq,
                    time_ms,
                    kind,
                    $($field: read_field!($ty, reader, stringify!($field)),)*
                    prev_hash: String::new(),
                    hash: String::new(),
                })
            }
        }
    };
}

// The fields. Never reorder, rename or retype one: the canonical encoding (and so every
// stored hash) follows this order. A new field goes at the end, `WhenSet`.
audit_event! {
    /// The identity issued or asked for.
    spiffe_id: Text, AsIs, Always;
    /// The caller's namespace.
    namespace: Text, AsIs, Always;
    /// The caller's service account.
    service_account: Text, AsIs, Always;
    /// The caller's pod, from the token's `kubernetes.io` claim.
    pod_name: Text, AsIs, Always;
    /// The caller's pod uid.
    pod_uid: Text, AsIs, Always;
    /// The issuer (`iss`) of the caller's token.
    token_issuer: Text, AsIs, Always;
    /// The certificate's serial, lowercase hex.
    serial: Text, AsIs, Always;
    /// The certificate's notBefore, unix seconds.
    not_before: Int, UnixSecs, Always;
    /// The certificate's notAfter, unix seconds.
    not_after: Int, UnixSecs, Always;
    /// The authority that signed (or changed).
    authority_id: Int, AsIs, Always;
    /// SHA-256 of the certified public key (SubjectPublicKeyInfo DER), hex.
    public_key_sha256: Text, AsIs, Always;
    /// SHA-256 of the CSR's DER, hex.
    csr_sha256: Text, AsIs, Always;
    /// The caller's address.
    peer: Text, AsIs, Always;
    /// The gRPC code of a refusal, e.g. `UNAUTHENTICATED`.
    code: Text, AsIs, Always;
    /// Why: the refusal's message, or what an authority event did.
    reason: Text, AsIs, Always;
    /// How many refusals this event stands for, when aggregated; how many events a prune
    /// removed.
    count: Int, AsIs, Always;
    /// The OS user behind an authority change.
    operator: Text, AsIs, Always;
    /// The caller's SPIFFE ID, when it is not `spiffe_id`: a node proxy (ztunnel) asking for
    /// a pod's identity.
    caller: Text, AsIs, WhenSet;
    /// The node the caller runs on, from its token (or its TokenReview).
    node: Text, AsIs, WhenSet;
    /// What a refused caller asked for (its `ImpersonatedIdentity`), as it claimed it: never
    /// verified, so never in the identity fields above. Escaped and cut to 256 bytes.
    requested: Text, AsIs, WhenSet;
    /// For a prune: the anchor the chain now starts from, its sequence number.
    anchor_seq: Int, AsIs, WhenSet;
    /// For a prune: that anchor's hash.
    anchor_hash: Text, AsIs, WhenSet;
    /// For a JWT-SVID: the audiences it was minted for, a JSON array. Only JWT-SVIDs have
    /// one (their `serial` is the token's `jti`, `not_before` and `not_after` its `iat` and
    /// `exp`; they certify no key, so `public_key_sha256` and `csr_sha256` are empty).
    audience: Text, AsIs, WhenSet;
    /// For a pod certificate: the PodCertificateRequest answered, `<namespace>/<name>`.
    request: Text, AsIs, WhenSet;
    /// That request's `metadata.uid`.
    request_uid: Text, AsIs, WhenSet;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
        }
        assert!("issued\n".parse::<EventKind>().is_err());
    }

    #[test]
    fn values_follow_the_field_list() {
        let mut e = EventRow::new(EventKind::Issued);
        e.not_after = Some(7);
        e.anchor_hash = Some("h".into());
        let values = e.values();
        assert_eq!(values.len(), FIELDS.len());
        for (field, value) in FIELDS.iter().zip(values) {
            match (field.name, value) {
                ("not_after", v) => assert_eq!(v, FieldValue::Int(Some(7))),
                ("anchor_hash", v) => assert_eq!(v, FieldValue::Text(Some("h"))),
                (_, v) => assert!(v.is_none(), "{}", field.name),
            }
        }
        // Fields added after the first schema are left out of the encoding when empty.
        let first_later = FIELDS
            .iter()
            .position(|f| f.encoded == Encoded::WhenSet)
            .unwrap();
        assert!(
            FIELDS[first_later..]
                .iter()
                .all(|f| f.encoded == Encoded::WhenSet)
        );
        assert_eq!(FIELDS[first_later].name, "caller");
    }
}
