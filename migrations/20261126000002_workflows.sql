-- Durable workflows: instances, their step journal, and the signals they wait for.
--
-- A workflow is a list of named steps run one at a time as jobs of kind
-- `ledgerflow.workflow`. Each step's result is checkpointed into
-- `workflow_steps` in the same lease-fenced transaction that advances the
-- workflow row, enqueues the next step's job and finishes the current one, so
-- a crash leaves either no trace of the step or the whole checkpoint.

CREATE TABLE workflows (
    id                    uuid PRIMARY KEY,                -- UUID v7
    kind                  text NOT NULL CHECK (kind <> '' AND length(kind) <= 128),
    version               integer NOT NULL CHECK (version >= 1),
    state                 text NOT NULL CHECK (state IN (
                              'running', 'waiting', 'completed', 'failed',
                              'compensating', 'compensated', 'cancelled')),
    input                 jsonb NOT NULL DEFAULT '{}'::jsonb,
    output                jsonb,
    -- The step that runs next (or is waiting); NULL once finished.
    current_step          text,
    -- Why the workflow is waiting, for humans: 'signal:<name>:<key>' or 'timer'.
    wait_reason           text,
    -- The signal a waiting step waits for (machine-readable twin of wait_reason).
    wait_signal_name      text,
    wait_correlation_key  text,
    -- Bumped every time a step starts waiting for a signal; names its timeout job.
    wait_seq              integer NOT NULL DEFAULT 0,
    -- When the timer fires or the signal wait times out.
    wait_until            timestamptz,
    -- The queue its step jobs go to (set from the definition at start).
    queue                 text NOT NULL DEFAULT 'default' CHECK (queue <> '' AND length(queue) <= 128),
    -- Starting twice with the same key gives the same workflow.
    unique_key            text,
    error                 text,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    finished_at           timestamptz,
    CONSTRAINT workflows_finished_iff_final CHECK (
        (state IN ('completed', 'failed', 'compensated', 'cancelled')) = (finished_at IS NOT NULL)
    ),
    CONSTRAINT workflows_signal_wait_pair CHECK (
        (wait_signal_name IS NULL) = (wait_correlation_key IS NULL)
    )
);

CREATE UNIQUE INDEX workflows_unique_key ON workflows (unique_key) WHERE unique_key IS NOT NULL;
CREATE INDEX workflows_kind_created ON workflows (kind, created_at DESC);
CREATE INDEX workflows_state_updated ON workflows (state, updated_at DESC);
-- Who waits for signal (name, key): how a new signal finds its waiters.
CREATE INDEX workflows_waiting_signal ON workflows (wait_signal_name, wait_correlation_key)
    WHERE state = 'waiting' AND wait_signal_name IS NOT NULL;

-- The step journal: one row per step that reached a durable result.
CREATE TABLE workflow_steps (
    workflow_id      uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    step             text NOT NULL CHECK (step <> '' AND length(step) <= 128),
    -- The step's index in the definition (the journal's display order).
    position         integer NOT NULL DEFAULT 0,
    status           text NOT NULL CHECK (status IN ('completed', 'failed', 'in_doubt', 'compensated')),
    output           jsonb,
    error            text,
    -- Deterministic from (workflow id, step): '<workflow_id>:<step>'. Carried by
    -- every external call the step makes (contract rule 3).
    idempotency_key  text NOT NULL UNIQUE,
    attempt          integer NOT NULL DEFAULT 1,
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz,
    PRIMARY KEY (workflow_id, step)
);

-- Signals: webhook and Kafka events that waiting workflows consume. A signal
-- that arrives before anyone waits for it is kept until a step consumes it.
CREATE TABLE signals (
    id                bigserial PRIMARY KEY,
    workflow_id       uuid REFERENCES workflows (id) ON DELETE SET NULL,  -- the consumer, once consumed
    name              text NOT NULL CHECK (name <> '' AND length(name) <= 128),
    correlation_key   text NOT NULL,
    payload           jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- The sender's event id: a duplicate delivery is applied once.
    dedupe_key        text NOT NULL UNIQUE,
    received_at       timestamptz NOT NULL,
    consumed_at       timestamptz,
    consumed_by_step  text,
    CONSTRAINT signals_consumed_pair CHECK ((consumed_at IS NULL) = (consumed_by_step IS NULL))
);

CREATE INDEX signals_pending ON signals (name, correlation_key, id) WHERE consumed_at IS NULL;
CREATE INDEX signals_workflow ON signals (workflow_id) WHERE workflow_id IS NOT NULL;
