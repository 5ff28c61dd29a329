-- Reverts 0011_client_index_partial: the client index over every row, as 0008 made it.
DROP INDEX dual_runs_client_created;
CREATE INDEX dual_runs_client_created ON dual_runs (client_id, created_at);
