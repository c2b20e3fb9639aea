-- Ambient mode: a node proxy (ztunnel) asks for the identities of the pods on its node. The
-- event then names the caller as well as the identity issued, and the node the caller runs
-- on (from its token). Keep in step with the other dialect's 0003.
ALTER TABLE audit_events ADD COLUMN caller TEXT; -- the caller's SPIFFE ID, when not spiffe_id
ALTER TABLE audit_events ADD COLUMN node TEXT;   -- the caller's node
-- Partial: events without them (most, and all older ones) cost the writer nothing here.
CREATE INDEX audit_events_caller ON audit_events (caller, seq) WHERE caller IS NOT NULL;
CREATE INDEX audit_events_node ON audit_events (node, seq) WHERE node IS NOT NULL;
