ALTER TABLE dual_runs DROP COLUMN owner_fingerprint;
