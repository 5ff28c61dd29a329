ALTER TABLE duet_instances DROP COLUMN incarnation;
