-- Who may resume a run with Last-Event-ID: hex SHA-256 over (run id bytes || the API key that
-- started it). The key itself is never stored; salting by run id makes equal keys give
-- unrelated values across runs. NULL when the run was started without API_KEYS (anyone may
-- resume it) and in rows written before this column existed.
ALTER TABLE dual_runs ADD COLUMN owner_fingerprint TEXT;
