-- Cost (contract §9): what each model call and each run cost in USD at the prices configured
-- when it ran (FLASH_/PRO_PRICE_INPUT_PER_MTOK, ..._OUTPUT_PER_MTOK). NULL when it is not
-- known: a price was not set, or the provider reported no token counts; never 0 for
-- unknown, so that SUM() over runs is not silently short (docs/audit.md, "Cost"). Older
-- rows get NULL; adding nullable columns rewrites no row. double precision holds the value
-- duet computed, bit for bit; round in queries (docs/audit.md has examples).
ALTER TABLE model_traces ADD COLUMN cost_usd double precision CHECK (cost_usd >= 0);
ALTER TABLE dual_runs ADD COLUMN cost_usd double precision CHECK (cost_usd >= 0);
