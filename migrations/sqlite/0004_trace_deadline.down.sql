-- Reverts 0004_trace_deadline: the deadline goes back to the end of error_message, as the
-- releases before it wrote it, and the column is dropped.
UPDATE model_traces
SET error_message = error_message || ' [deadline: ' || deadline || ']'
WHERE deadline IS NOT NULL AND error_message IS NOT NULL;

ALTER TABLE model_traces DROP COLUMN deadline;
