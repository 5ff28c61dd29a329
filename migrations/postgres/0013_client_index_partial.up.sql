-- The client index holds only runs started with a named key. Runs without one (every run of
-- a service with no key file, and the rows before 0010) have client_id NULL, and the index
-- entry each of them cost — twice per run, at its start row and at its record — served no
-- query: the `client_id` filter asks `client_id = ?`, which implies NOT NULL, so the
-- partial index answers it as the full one did (tests/api/runs_list.rs checks the plan).
DROP INDEX dual_runs_client_created;
CREATE INDEX dual_runs_client_created ON dual_runs (client_id, created_at)
    WHERE client_id IS NOT NULL;
