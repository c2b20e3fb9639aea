-- Certificates signed but never delivered (a pod certificate another writer answered first)
-- are recorded as ABORTED events; the convergence walk reads those within the longest
-- lifetime every 10 s. A partial index keeps that read to the few such rows instead of every
-- event of the window, and costs the audit writer nothing for any other event. Keep in step
-- with the other dialect's 0011.
CREATE INDEX audit_events_undelivered ON audit_events (time_ms) WHERE code = 'ABORTED';
