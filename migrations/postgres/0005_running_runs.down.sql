-- Reverts 0005_running_runs. Rows still 'running' or 'interrupted' have no model_traces, and
-- the releases before 0005 can neither store nor read such a row: they are deleted. Export
-- them first if they matter (SELECT * FROM dual_runs WHERE status IN ('running','interrupted')).
DELETE FROM dual_runs WHERE status IN ('running', 'interrupted');
DROP TABLE duet_instances;
DROP INDEX dual_runs_running;
ALTER TABLE dual_runs DROP COLUMN instance_id;
ALTER TABLE dual_runs DROP CONSTRAINT dual_runs_status_check;
ALTER TABLE dual_runs ADD CONSTRAINT dual_runs_status_check
    CHECK (status IN ('ok', 'partial', 'failed', 'cancelled'));
