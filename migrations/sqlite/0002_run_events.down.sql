ALTER TABLE dual_runs DROP COLUMN events;
