-- JWT-SVIDs are issuances too (kind 'issued'): their event holds the token's jti in serial,
-- iat and exp in not_before and not_after, and the audiences it was minted for here, a JSON
-- array. No certificate event has one, so it is what tells the two apart. Keep in step with
-- the other dialect's 0007.
ALTER TABLE audit_events ADD COLUMN audience TEXT;
