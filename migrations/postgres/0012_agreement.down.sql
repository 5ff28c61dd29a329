-- Reverts 0012_agreement: the releases before it did not measure the preview's agreement.
ALTER TABLE dual_runs DROP COLUMN agreement;
