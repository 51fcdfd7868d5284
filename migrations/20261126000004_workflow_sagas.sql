-- Sagas and in-doubt external calls on the workflow step journal.
--
-- External calls (contract rule 3): before a step calls the outside world it
-- commits an *intent* on its journal row (status 'calling', call_state
-- 'calling') in its own transaction, then records the call's answer
-- ('answered', 'rejected', 'not_sent' or 'unknown'). A step re-run that finds
-- an intent without a definite answer never re-sends: the step goes
-- 'in_doubt' and is settled by its reconcile hook or by an admin.
--
-- Sagas: when a step fails permanently, the completed steps' compensations run
-- in reverse order; each turns its row 'compensated' and records its output
-- (or its last error, when it exhausted its retries).

ALTER TABLE workflow_steps DROP CONSTRAINT workflow_steps_status_check;
ALTER TABLE workflow_steps ADD CONSTRAINT workflow_steps_status_check
    CHECK (status IN ('calling', 'completed', 'failed', 'in_doubt', 'compensated'));

ALTER TABLE workflow_steps
    -- The step's external call: intent, then answer.
    ADD COLUMN call_state text
        CHECK (call_state IN ('calling', 'answered', 'rejected', 'not_sent', 'unknown')),
    ADD COLUMN call_attempt integer,
    ADD COLUMN call_started_at timestamptz,
    ADD COLUMN call_finished_at timestamptz,
    ADD COLUMN call_output jsonb,
    ADD COLUMN call_error text,
    -- Reconcile hook runs of the current in-doubt episode.
    ADD COLUMN reconcile_attempts integer NOT NULL DEFAULT 0,
    -- Who settled an in-doubt step: 'reconcile' or 'admin'.
    ADD COLUMN resolved_by text CHECK (resolved_by IN ('reconcile', 'admin')),
    -- The step's compensation (sagas).
    ADD COLUMN compensation_output jsonb,
    ADD COLUMN compensation_error text,
    ADD COLUMN compensation_attempt integer,
    ADD COLUMN compensated_at timestamptz,
    ADD CONSTRAINT workflow_steps_calling_has_intent CHECK (status <> 'calling' OR call_state IS NOT NULL);

-- What admins must look at: steps in doubt.
CREATE INDEX workflow_steps_in_doubt ON workflow_steps (started_at) WHERE status = 'in_doubt';
