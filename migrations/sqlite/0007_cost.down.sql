-- Reverts 0007_cost: the releases before it kept token counts but no cost.
ALTER TABLE dual_runs DROP COLUMN cost_usd;
ALTER TABLE model_traces DROP COLUMN cost_usd;
