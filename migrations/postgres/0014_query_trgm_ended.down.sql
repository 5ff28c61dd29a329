-- Reverts 0014_query_trgm_ended: the trigram index over every run, as 0011 made it.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index
               WHERE indexrelid = to_regclass('dual_runs_query_trgm') AND indpred IS NOT NULL) THEN
        DROP INDEX dual_runs_query_trgm;
        CREATE INDEX dual_runs_query_trgm ON dual_runs USING gin (query gin_trgm_ops);
    END IF;
END
$$;
