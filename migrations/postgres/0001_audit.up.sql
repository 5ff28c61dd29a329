-- The audit trail (contract §5), PostgreSQL flavour.

CREATE TABLE dual_runs (
    run_id            UUID        NOT NULL PRIMARY KEY,  -- UUIDv7: sorts by creation time
    client_request_id TEXT,
    created_at        TIMESTAMPTZ NOT NULL,
    query             TEXT        NOT NULL,
    system            TEXT,
    status            TEXT        NOT NULL
        CHECK (status IN ('ok', 'partial', 'failed', 'cancelled')),
    total_ms          BIGINT      NOT NULL CHECK (total_ms >= 0),
    service_version   TEXT        NOT NULL
);

-- Recent runs, and the time window of every per-hour / per-day question.
CREATE INDEX dual_runs_created_at ON dual_runs (created_at);
-- Runs by status (recent failures first).
CREATE INDEX dual_runs_status_created_at ON dual_runs (status, created_at);
-- All runs of one client request id.
CREATE INDEX dual_runs_client_request_id ON dual_runs (client_request_id)
    WHERE client_request_id IS NOT NULL;

CREATE TABLE model_traces (
    run_id        UUID    NOT NULL REFERENCES dual_runs (run_id) ON DELETE CASCADE,
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
    latency_ms    BIGINT  NOT NULL CHECK (latency_ms >= 0),
    ttft_ms       BIGINT  CHECK (ttft_ms >= 0),
    input_tokens  BIGINT  CHECK (input_tokens >= 0),
    output_tokens BIGINT  CHECK (output_tokens >= 0),
    PRIMARY KEY (run_id, model)
);

-- Timeouts and errors by model; failure rates by model.
CREATE INDEX model_traces_model_outcome ON model_traces (model, outcome);
