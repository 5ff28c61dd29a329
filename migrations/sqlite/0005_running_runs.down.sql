-- Reverts 0005_running_runs. Rows still 'running' or 'interrupted' have no model_traces, and
-- the releases before 0005 can neither store nor read such a row: they are deleted. Export
-- them first if they matter (SELECT * FROM dual_runs WHERE status IN ('running','interrupted')).
-- Both tables are rebuilt, for the reason given in the up migration.

DELETE FROM dual_runs WHERE status IN ('running', 'interrupted');

CREATE TABLE dual_runs_0004 (
    run_id            TEXT    NOT NULL PRIMARY KEY,
    client_request_id TEXT,
    created_at        TEXT    NOT NULL,
    query             TEXT    NOT NULL,
    system            TEXT,
    status            TEXT    NOT NULL CHECK (status IN ('ok', 'partial', 'failed', 'cancelled')),
    total_ms          INTEGER NOT NULL CHECK (total_ms >= 0),
    service_version   TEXT    NOT NULL,
    events            TEXT,
    owner_fingerprint TEXT
);

INSERT INTO dual_runs_0004 (run_id, client_request_id, created_at, query, system, status,
                            total_ms, service_version, events, owner_fingerprint)
SELECT run_id, client_request_id, created_at, query, system, status, total_ms,
       service_version, events, owner_fingerprint
FROM dual_runs;

CREATE TABLE model_traces_0004 (
    run_id        TEXT    NOT NULL REFERENCES dual_runs_0004 (run_id) ON DELETE CASCADE,
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

INSERT INTO model_traces_0004 (run_id, model, provider, model_name, model_version, outcome,
                               error_type, error_message, text, finish_reason, latency_ms,
                               ttft_ms, input_tokens, output_tokens, deadline)
SELECT run_id, model, provider, model_name, model_version, outcome, error_type, error_message,
       text, finish_reason, latency_ms, ttft_ms, input_tokens, output_tokens, deadline
FROM model_traces;

DROP TABLE model_traces;
DROP TABLE dual_runs;
ALTER TABLE dual_runs_0004 RENAME TO dual_runs;
ALTER TABLE model_traces_0004 RENAME TO model_traces;

CREATE INDEX dual_runs_created_at ON dual_runs (created_at);
CREATE INDEX dual_runs_status_created_at ON dual_runs (status, created_at);
CREATE INDEX dual_runs_client_request_id ON dual_runs (client_request_id)
    WHERE client_request_id IS NOT NULL;
CREATE INDEX model_traces_model_outcome ON model_traces (model, outcome);

DROP TABLE duet_instances;
