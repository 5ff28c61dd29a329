-- The trigram index that serves `GET /runs?q=` holds ended runs only.
--
-- A run's row is written twice: its `running` start row, then its record, which updates the
-- row's status. That update changes an indexed column, so PostgreSQL writes every index entry
-- of the row anew, and the full trigram index paid for each query's trigrams twice per run —
-- about a fifth of the audit writer's time on the server (docs/benchmarks.md). Over ended runs
-- only, the start row costs it nothing and the record once. The runs still running are few
-- (those in flight) and `dual_runs_running` finds them: the list asks for them by an
-- alternative the planner answers with both indexes (src/audit/list.rs).
--
-- Rebuilding the index holds off writes to `dual_runs` while it runs, which over a large table
-- is long: an operator can build it beforehand with CREATE INDEX CONCURRENTLY under another
-- name and rename it (docs/operations.md, "Migrations and rolling back"). An index of this name
-- that is already partial is left alone; where pg_trgm could not be had (0011 made no index),
-- none is made either.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index
               WHERE indexrelid = to_regclass('dual_runs_query_trgm') AND indpred IS NULL) THEN
        DROP INDEX dual_runs_query_trgm;
        CREATE INDEX dual_runs_query_trgm ON dual_runs USING gin (query gin_trgm_ops)
            WHERE status <> 'running';
    END IF;
END
$$;
