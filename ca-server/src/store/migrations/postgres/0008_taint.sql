-- A tainted authority is one the operator marked compromised (`root taint`): its root stays
-- in the bundle while its holders move on, the bundle names it, and agents renew at once.
-- Keep in step with the other dialect's 0008.
ALTER TABLE authorities ADD COLUMN tainted_at BIGINT; -- unix seconds
