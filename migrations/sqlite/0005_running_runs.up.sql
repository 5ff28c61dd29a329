-- A run's row exists while it runs (status 'running', written within milliseconds of its
-- start) and a run whose process died is finalized 'interrupted' (contract §8).
--
-- SQLite cannot change a CHECK constraint in place, so dual_runs is rebuilt. Migrations run
-- inside a transaction (sqlx 0.8 ignores `-- no-transaction` on SQLite), where
-- `PRAGMA foreign_keys = OFF` does nothing, and with foreign keys on, dropping the old
-- dual_runs would cascade into model_traces. So model_traces is rebuilt too, its new copy
-- pointing at the new dual_runs: dropping the old tables then touches no row that is kept,
-- and renaming the new dual_runs rewrites the reference. The cost is one copy of both
-- tables, once.

CREATE TABLE dual_runs_0005 (
    run_id            TEXT    NOT NULL PRIMARY KEY,  -- UUIDv7, hyphenated lower case
    client_request_id TEXT,
    created_at        TEXT    NOT NULL,
    query             TEXT    NOT NULL,
    system            TEXT,
    status            TEXT    NOT NULL CHECK (status IN
        ('ok', 'partial', 'failed', 'cancelled', 'running', 'interrupted')),
    total_ms          INTEGER NOT NULL CHECK (total_ms >= 0),
    service_version   TEXT    NOT NULL,
    events            TEXT,
    owner_fingerprint TEXT,
    -- The process that ran it (a UUIDv7 made at its start); NULL in rows written before.
    instance_id       TEXT
);

INSERT INTO dual_runs_0005 (run_id, client_request_id, created_at, query, system, status,
                            total_ms, service_version, events, owner_fingerprint)
SELECT run_id, client_request_id, created_at, query, system, status, total_ms,
       service_version, events, owner_fingerprint
FROM dual_runs;

CREATE TABLE model_traces_0005 (
    run_id        TEXT    NOT NULL REFERENCES dual_runs_0005 (run_id) ON DELETE CASCADE,
    model         TEXT    NOT NULL CHECK (model IN ('flash', 'pro')),
    provider      TEXT    NOT NULL,
    model_name    TEXT    NOT NULL,
    model_version TEXT,
    outcome       TEXT    NOT NULL
        CHECK (outcome IN ('ok', 'timeout', 'error', 'skipped', 'cancelled')),
    error_type    TEXT,
    error_message TEXT,
    text          TEXT    NOT NULL,
    finish_reason TEXT,
    latency_ms    INTEGER NOT NULL CHECK (latency_ms >= 0),
    ttft_ms       INTEGER CHECK (ttft_ms >= 0),
    input_tokens  INTEGER CHECK (input_tokens >= 0),
    output_tokens INTEGER CHECK (output_tokens >= 0),
    deadline      TEXT    CHECK (deadline IN ('total', 'first_token', 'stall')),
    PRIMARY KEY (run_id, model)
);

INSERT INTO model_traces_0005 (run_id, model, provider, model_name, model_version, outcome,
                               error_type, error_message, text, finish_reason, latency_ms,
                               ttft_ms, input_tokens, output_tokens, deadline)
SELECT run_id, model, provider, model_name, model_version, outcome, error_type, error_message,
       text, finish_reason, latency_ms, ttft_ms, input_tokens, output_tokens, deadline
FROM model_traces;

DROP TABLE model_traces;
DROP TABLE dual_runs;
ALTER TABLE dual_runs_0005 RENAME TO dual_runs;
ALTER TABLE model_traces_0005 RENAME TO model_traces;

CREATE INDEX dual_runs_created_at ON dual_runs (created_at);
CREATE INDEX dual_runs_status_created_at ON dual_runs (status, created_at);
CREATE INDEX dual_runs_client_request_id ON dual_runs (client_request_id)
    WHERE client_request_id IS NOT NULL;
-- The runs in flight, by process: what finalizing a dead process's runs looks for. Small,
-- since a row leaves it when its run ends.
CREATE INDEX dual_runs_running ON dual_runs (instance_id) WHERE status = 'running';
CREATE INDEX model_traces_model_outcome ON model_traces (model, outcome);

-- Replicas sharing one database and their heartbeats (used on PostgreSQL; one process owns
-- a SQLite file, and the table stays empty). Kept in both schemas so that they match.
CREATE TABLE duet_instances (
    instance_id  TEXT NOT NULL PRIMARY KEY,
    started_at   TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL
);
