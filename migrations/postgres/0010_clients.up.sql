-- Named API keys (contract §11): the name of the key that started a run, never the key.
-- NULL for runs started without a key file (no key, or an unnamed key from API_KEYS) and for
-- older rows. The index serves the usage-by-client questions (docs/audit.md).
ALTER TABLE dual_runs ADD COLUMN client_id TEXT;
CREATE INDEX dual_runs_client_created ON dual_runs (client_id, created_at);

-- Each named key's usage per UTC day, shared by every replica on this database: the daily
-- budgets of the key file are checked against it when a run starts (`runs` + 1, in one
-- INSERT ... ON CONFLICT) and a run's tokens and cost are added to it when the run ends
-- (one more). A run counts on the UTC day it started, like `dual_runs.created_at`, so the
-- audit queries of docs/audit.md give the same sums. Logged, unlike the rate-limit
-- buckets: these rows are money, and a crash must not hand every client a fresh budget.
-- One row per client per day; nothing deletes old days (a year of 100 clients is 36,500
-- small rows).
CREATE TABLE client_usage (
    client TEXT NOT NULL,
    day DATE NOT NULL,
    runs BIGINT NOT NULL DEFAULT 0,
    tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (client, day)
);
