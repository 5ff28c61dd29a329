-- Instance ids are configured (INSTANCE_ID, default host name and port), so a replica
-- restarted under the same id meets the row of the process it replaces. Each process also
-- makes a fresh incarnation id at start: the heartbeat and the deregistration touch only the
-- row of their own incarnation, and a start that finds another incarnation's fresh row tells
-- a dead predecessor (its heartbeat stops) from a live replica given the same id by mistake
-- (its heartbeat goes on; the start is refused).
ALTER TABLE duet_instances ADD COLUMN incarnation TEXT NOT NULL DEFAULT '';
