-- Cheaper step checkpoints: every step of every workflow updates its workflow row and inserts
-- one journal row, so each index those writes maintain is paid once per step.
--
-- * An index holding `updated_at` made every workflow-row update non-HOT (a new entry in every
--   index of the table), although between steps nothing indexed changes. Admin lists by state
--   now walk (state, created_at); sorting them by `updated_at` sorts the matching rows instead.
-- * Free space on each page (fillfactor 85) lets those updates stay on their page (HOT).
-- * `workflow_steps.idempotency_key` is `{workflow_id}:{step}` by construction, so its own
--   unique index only duplicated the primary key's check.
DROP INDEX workflows_state_updated;
CREATE INDEX workflows_state_created ON workflows (state, created_at DESC);
ALTER TABLE workflows SET (fillfactor = 85);
ALTER TABLE workflow_steps DROP CONSTRAINT workflow_steps_idempotency_key_key;
