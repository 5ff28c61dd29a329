-- Rate-limit buckets shared by every replica on this database (contract §8): one row per
-- client (an API key's fingerprint, or a client address), holding the GCRA "theoretical
-- arrival time": the instant the client's bucket is full again. A request takes its place
-- by moving `tat` forward in one INSERT ... ON CONFLICT DO UPDATE, so concurrent requests on
-- any replica are serialized by the row lock and the budget is one, not one per replica.
--
-- UNLOGGED: the rows are a few seconds' state, rewritten on every request. Skipping the WAL
-- makes each request's write cheaper; what a crash loses (the table comes back empty) only
-- hands every client a full bucket, which is what a restart of a single replica does too.
-- A row whose `tat` has passed means the same as no row and is deleted by any replica's
-- housekeeping, so the table holds only clients active in the last burst's worth of time.
CREATE UNLOGGED TABLE rate_limit_buckets (
    bucket TEXT PRIMARY KEY,
    tat TIMESTAMPTZ NOT NULL
);
