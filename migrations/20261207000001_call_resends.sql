-- How many times a step's in-doubt call was sent again after its reconcile
-- hook learned that the other side never received it (bounded by the
-- workflow definition's max_resends).
ALTER TABLE workflow_steps ADD COLUMN call_resends integer NOT NULL DEFAULT 0;
