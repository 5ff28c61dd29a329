-- The pg_trgm extension stays: something else in the database may use it.
DROP INDEX IF EXISTS dual_runs_query_trgm;
DROP INDEX model_traces_model_name;
