-- Preview agreement (contract §12): how far the Flash answer used the same words as the Pro
-- answer, in [0, 1] (docs/audit.md, "Agreement", says how it is measured). NULL unless both
-- models answered ok; older rows get NULL too, as their agreement was never measured. Adding
-- a nullable column rewrites no row. double precision holds the value duet computed (and
-- sent in `done`), bit for bit.
ALTER TABLE dual_runs ADD COLUMN agreement double precision CHECK (agreement BETWEEN 0 AND 1);
