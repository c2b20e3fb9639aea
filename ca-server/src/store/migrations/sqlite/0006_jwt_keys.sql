-- One JWT-SVID signing key (ES256) per authority, made with it and retired with it: its
-- public half is in the SPIFFE bundle (`use: jwt-svid`) while the authority is not retired.
-- Keep in step with the other dialect's 0006.
CREATE TABLE jwt_keys (
    authority_id INTEGER PRIMARY KEY REFERENCES authorities (id),
    kid          TEXT    NOT NULL UNIQUE, -- the RFC 7638 thumbprint of public_jwk
    key_ref      TEXT    NOT NULL,        -- file:keys/<id>.jwt.<suffix>.key.pem or sealed:<kek id>
    sealed_key   TEXT,                    -- the key sealed under the KEK, when key_ref is sealed:
    public_jwk   TEXT    NOT NULL,        -- {"crv":"P-256","kty":"EC","x":…,"y":…}
    created_at   INTEGER NOT NULL         -- unix seconds
);
