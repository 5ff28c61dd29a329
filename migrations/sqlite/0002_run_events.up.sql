-- Keeps the events each client was sent (SSE text, without deltas), so that a reconnect
-- with Last-Event-ID can be answered by any replica sharing this database, after the run
-- has left the memory of the one that ran it.
ALTER TABLE dual_runs ADD COLUMN events TEXT;
