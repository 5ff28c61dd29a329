-- A run's row exists while it runs (status 'running', written within milliseconds of its
-- start) and a run whose process died is finalized 'interrupted' (contract §8).
ALTER TABLE dual_runs DROP CONSTRAINT dual_runs_status_check;
ALTER TABLE dual_runs ADD CONSTRAINT dual_runs_status_check CHECK (status IN
    ('ok', 'partial', 'failed', 'cancelled', 'running', 'interrupted'));

-- The process that ran it (a UUIDv7 made at its start); NULL in rows written before.
ALTER TABLE dual_runs ADD COLUMN instance_id TEXT;

-- The runs in flight, by process: what finalizing a dead replica's runs looks for. Small,
-- since a row leaves it when its run ends.
CREATE INDEX dual_runs_running ON dual_runs (instance_id) WHERE status = 'running';

-- Replicas sharing this database. Each refreshes heartbeat_at every few seconds (database
-- time, so replicas' clocks do not matter); a row older than INSTANCE_LEASE_S is a dead
-- replica, whose running runs any live replica finalizes 'interrupted' and whose row it
-- deletes, in one transaction.
CREATE TABLE duet_instances (
    instance_id  TEXT        NOT NULL PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL
);
