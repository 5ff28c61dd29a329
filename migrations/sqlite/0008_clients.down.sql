-- Reverts 0008_clients: the releases before it did not know which named key started a run.
DROP INDEX IF EXISTS dual_runs_client_created;
ALTER TABLE dual_runs DROP COLUMN client_id;
