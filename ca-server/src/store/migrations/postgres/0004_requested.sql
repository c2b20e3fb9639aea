-- What a refused caller claimed (its ImpersonatedIdentity), kept apart from the identity
-- columns, which hold only what a verified credential or the node check established. Keep in
-- step with the other dialect's 0004.
ALTER TABLE audit_events ADD COLUMN requested TEXT;
