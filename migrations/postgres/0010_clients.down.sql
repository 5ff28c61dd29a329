-- Reverts 0010_clients.
DROP TABLE IF EXISTS client_usage;
DROP INDEX IF EXISTS dual_runs_client_created;
ALTER TABLE dual_runs DROP COLUMN client_id;
