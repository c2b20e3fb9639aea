-- Authorities: the signing certificates, their chains, where their keys live, and their state.
CREATE TABLE authorities (
    id                 INTEGER PRIMARY KEY,
    state              TEXT    NOT NULL CHECK (state IN ('prepared', 'active', 'retiring', 'retired')),
    kind               TEXT    NOT NULL CHECK (kind IN ('self-signed', 'imported')),
    subject            TEXT    NOT NULL,
    cert_pem           TEXT    NOT NULL, -- the signing certificate
    chain_pem          TEXT    NOT NULL, -- certificates above it, up to and including the root
    root_pem           TEXT    NOT NULL, -- the root its leaves chain to
    key_ref            TEXT    NOT NULL, -- where the private key lives, e.g. file:keys/1.key.pem
    not_before         INTEGER NOT NULL, -- unix seconds
    not_after          INTEGER NOT NULL, -- unix seconds
    fingerprint_sha256 TEXT    NOT NULL, -- of the signing certificate's DER, lowercase hex
    created_at         INTEGER NOT NULL, -- unix seconds, also when it was prepared
    activated_at       INTEGER,
    retiring_at        INTEGER,
    retired_at         INTEGER
);
-- Exactly one authority signs at a time.
CREATE UNIQUE INDEX authorities_one_active ON authorities (state) WHERE state = 'active';

-- The trust bundle's sequence: one row, bumped on every change of the bundle's contents.
CREATE TABLE bundle (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    sequence INTEGER NOT NULL
);
INSERT INTO bundle (id, sequence) VALUES (1, 0);

-- The audit log: every decision, hash-chained in seq order.
CREATE TABLE audit_events (
    seq               INTEGER PRIMARY KEY,
    time_ms           INTEGER NOT NULL, -- unix milliseconds
    -- anchor: stands for the pruned events before it, holding the hash the chain continues
    -- from; prune: records a prune (it is chained like any other event).
    kind              TEXT    NOT NULL CHECK (kind IN ('issued', 'denied', 'authority', 'anchor', 'prune')),
    spiffe_id         TEXT,
    namespace         TEXT,
    service_account   TEXT,
    pod_name          TEXT,
    pod_uid           TEXT,
    token_issuer      TEXT,
    serial            TEXT,    -- lowercase hex, no separators
    not_before        INTEGER, -- unix seconds
    not_after         INTEGER, -- unix seconds
    authority_id      INTEGER,
    public_key_sha256 TEXT,
    csr_sha256        TEXT,
    peer              TEXT,
    code              TEXT,    -- gRPC code name of a refusal
    reason            TEXT,
    count             INTEGER, -- refusals aggregated into one event
    operator          TEXT,    -- OS user behind an authority change
    prev_hash         TEXT    NOT NULL,
    hash              TEXT    NOT NULL
);
CREATE INDEX audit_events_spiffe_id ON audit_events (spiffe_id, seq);
CREATE INDEX audit_events_serial ON audit_events (serial);
CREATE INDEX audit_events_time ON audit_events (time_ms);
CREATE INDEX audit_events_sa ON audit_events (namespace, service_account, seq);
CREATE INDEX audit_events_service_account ON audit_events (service_account, seq);
CREATE INDEX audit_events_kind ON audit_events (kind, seq);
CREATE INDEX audit_events_authority ON audit_events (authority_id, seq);
CREATE INDEX audit_events_validity ON audit_events (not_before);

-- Facts about the log kept as events are appended, so that queries stay bounded.
CREATE TABLE audit_meta (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    -- The longest notAfter - notBefore of any certificate in the log (seconds): a certificate
    -- valid at T has notBefore in [T - max_lifetime, T], which keeps --valid-at a range scan.
    max_lifetime INTEGER NOT NULL
);
INSERT INTO audit_meta (id, max_lifetime) VALUES (1, 0);

-- Signed checkpoints: the chain head at some moment, signed with the audit key, so that an
-- exported checkpoint vouches for history even against someone who can rewrite the database.
CREATE TABLE audit_checkpoints (
    seq        INTEGER PRIMARY KEY, -- the event the checkpoint covers (the head then)
    hash       TEXT    NOT NULL,    -- that event's hash
    time_ms    INTEGER NOT NULL,    -- when it was signed
    public_key TEXT    NOT NULL,    -- Ed25519 public key, base64
    signature  TEXT    NOT NULL     -- over checkpoint_message(seq, hash, time_ms), base64
);
