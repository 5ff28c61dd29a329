-- GET /runs (contract §12): indexes for the filters no index served yet.
--
-- `model_name` (either model): the list asks
-- `run_id IN (SELECT run_id FROM model_traces WHERE model_name = $n)`, answered from this
-- index alone. The other filters use indexes that exist: status →
-- dual_runs_status_created_at, since/until and the cursor → dual_runs_created_at, client_id
-- → dual_runs_client_created.
CREATE INDEX model_traces_model_name ON model_traces (model_name, run_id);

-- `q` (a case-sensitive substring, asked as `query LIKE '%…%'`): a trigram index, when the
-- pg_trgm extension can be had (it ships with PostgreSQL's contrib and is "trusted" since
-- PostgreSQL 13, so a database owner may create it). Where it cannot, the migration still
-- succeeds without it, and `q` is checked on the rows the other filters and the newest-first
-- order reach (docs/operations.md). The index costs some write time per run (every query's
-- trigrams), paid so that searching months of runs does not read all of them.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX dual_runs_query_trgm ON dual_runs USING gin (query gin_trgm_ops);
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm is not available (%): GET /runs?q= reads rows without an index',
        SQLERRM;
END
$$;
