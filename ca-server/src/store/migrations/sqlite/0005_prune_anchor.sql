-- The anchor a prune event vouches for, in columns of its own rather than in its reason's
-- text. Prune events written before this migration keep it only in their reason (and are
-- read that way); their hashes cover what they hold, so they are not filled in. Keep in step
-- with the other dialect's 0005.
ALTER TABLE audit_events ADD COLUMN anchor_seq INTEGER;
ALTER TABLE audit_events ADD COLUMN anchor_hash TEXT;
