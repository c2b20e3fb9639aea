-- Bundle propagation, observed. An authority's root joins the bundle at a sequence; a client
-- holding that sequence or a later one trusts it. Each server records which sequence it last
-- gave each client (by address), over a watch stream or a poll, so that `root activate` can
-- refuse while a client seen within the refresh-hint window still holds an older bundle. Keep
-- in step with the other dialect's 0009.
ALTER TABLE authorities ADD COLUMN joined_sequence INTEGER; -- NULL for authorities from before
CREATE TABLE bundle_clients (
    replica     TEXT    NOT NULL, -- the server process that saw it (random per start)
    client      TEXT    NOT NULL, -- the address (IPv6 by its /64), or (others) past the cap
    via         TEXT    NOT NULL CHECK (via IN ('watch', 'poll')),
    sequence    INTEGER NOT NULL, -- the bundle sequence last given to it
    seen_at     INTEGER NOT NULL, -- unix seconds
    window_secs INTEGER NOT NULL, -- that server's refresh hint: how long the sighting counts
    PRIMARY KEY (replica, client, via)
);
CREATE INDEX bundle_clients_seen ON bundle_clients (seen_at);
