-- Pod certificates (--pod-certificate-signer). Each answer to a PodCertificateRequest names
-- the request (namespace/name) and its uid in its audit event. A replica claims a request
-- here before it signs, so that replicas on one store never both sign one request; a claim
-- older than its holder's deadline may be taken over (the holder stopped). The status
-- write's resourceVersion stays the arbiter against any other writer. Keep in step with the
-- other dialect's 0010.
ALTER TABLE audit_events ADD COLUMN request TEXT;
ALTER TABLE audit_events ADD COLUMN request_uid TEXT;
CREATE TABLE pod_certificate_claims (
    request_uid TEXT    PRIMARY KEY, -- the PodCertificateRequest's metadata.uid
    replica     TEXT    NOT NULL,    -- the server process holding it (random per start)
    claimed_at  INTEGER NOT NULL     -- unix seconds
);
CREATE INDEX pod_certificate_claims_at ON pod_certificate_claims (claimed_at);
