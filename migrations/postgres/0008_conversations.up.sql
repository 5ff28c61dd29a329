-- Conversations and generation parameters (contract §7): what the client sent, as jsonb so
-- that operators can query into it (docs/audit.md). `messages` is the whole conversation,
-- the system prompt first, as an array of {"role", "content"}; NULL when the client sent
-- `query` (then `query` and `system` say it all). `params` is the parameters as sent
-- ({"max_tokens", "temperature", "thinking", "flash": {...}, "pro": {...}}); NULL when none
-- were sent. Older rows get NULL in both. Adding nullable columns rewrites no row.
ALTER TABLE dual_runs ADD COLUMN messages jsonb;
ALTER TABLE dual_runs ADD COLUMN params jsonb;
