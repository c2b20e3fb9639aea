-- Keys sealed under a key-encryption key (AES-256-GCM), for authorities whose key_ref is
-- `sealed:<kek id>`: replicas share them through the database, which never sees the KEK.
ALTER TABLE authorities ADD COLUMN sealed_key TEXT;
