-- GET /runs (contract §12): the one filter no index served yet, `model_name` (either
-- model). The list asks `run_id IN (SELECT run_id FROM model_traces WHERE model_name = ?)`,
-- which this answers from the index alone. The other filters use indexes that exist:
-- status → dual_runs_status_created_at, since/until and the cursor → dual_runs_created_at,
-- client_id → dual_runs_client_created. `q` (a substring) cannot use a b-tree: it is
-- checked on the rows the other filters and the newest-first order reach.
CREATE INDEX model_traces_model_name ON model_traces (model_name, run_id);
