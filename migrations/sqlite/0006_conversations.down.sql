-- Reverts 0006_conversations: the releases before it kept only `query` and `system`.
ALTER TABLE dual_runs DROP COLUMN params;
ALTER TABLE dual_runs DROP COLUMN messages;
