-- Named API keys (contract §11): the name of the key that started a run, never the key.
-- NULL for runs started without a key file (no key, or an unnamed key from API_KEYS) and for
-- older rows. The index serves the usage-by-client questions (docs/audit.md): one client's
-- runs over a time range, newest first.
ALTER TABLE dual_runs ADD COLUMN client_id TEXT;
CREATE INDEX dual_runs_client_created ON dual_runs (client_id, created_at);
