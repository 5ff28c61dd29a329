-- Reverts 0001_audit: drops the audit tables (and their indexes). The data goes with them;
-- export it first if it matters.
DROP TABLE IF EXISTS model_traces;
DROP TABLE IF EXISTS dual_runs;
