-- The audit trail (contract §5), SQLite flavour.
-- Timestamps are TEXT in RFC 3339 UTC with microseconds and a 'Z' suffix
-- (2025-01-31T12:34:56.123456Z): fixed width, so text order is time order, and SQLite's date
-- functions read them as they are.

CREATE TABLE dual_runs (
    run_id            TEXT    NOT NULL PRIMARY KEY,  -- UUIDv7, hyphenated lower case
    client_request_id TEXT,
    created_at        TEXT    NOT NULL,
    query             TEXT    NOT NULL,
    system            TEXT,
    status            TEXT    NOT NULL CHECK (status IN ('ok', 'partial', 'failed', 'cancelled')),
    total_ms          INTEGER NOT NULL CHECK (total_ms >= 0),
    service_version   TEXT    NOT NULL
);

-- Recent runs, and the time window of every per-hour / per-day question.
CREATE INDEX dual_runs_created_at ON dual_runs (created_at);
-- Runs by status (recent failures first).
CREATE INDEX dual_runs_status_created_at ON dual_runs (status, created_at);
-- All runs of one client request id.
CREATE INDEX dual_runs_client_request_id ON dual_runs (client_request_id)
    WHERE client_request_id IS NOT NULL;

CREATE TABLE model_traces (
    run_id        TEXT    NOT NULL REFERENCES dual_runs (run_id) ON DELETE CASCADE,
    model         TEXT    NOT NULL CHECK (model IN ('flash', 'pro')),  -- the role
    provider      TEXT    NOT NULL,
    model_name    TEXT    NOT NULL,  -- the model name sent upstream
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
    PRIMARY KEY (run_id, model)
);

-- Timeouts and errors by model; failure rates by model.
CREATE INDEX model_traces_model_outcome ON model_traces (model, outcome);
