-- The engine's durable job queue: jobs, their attempt history, and queue controls.
--
-- Claiming must stay fast however much history accumulates, so every hot query
-- is served by a partial index that only ever contains live rows:
--   * jobs_claim      — available jobs, in claim order (queue, priority, run_at, id)
--   * jobs_due        — scheduled/retryable jobs waiting for their run_at
--   * jobs_running    — leased jobs, for heartbeats and the lease reaper
-- Finished rows (completed, cancelled, failed, discarded) appear in none of them.

CREATE TYPE job_state AS ENUM (
    'scheduled',   -- waiting for run_at (first run in the future, or snoozed)
    'available',   -- ready to be claimed
    'running',     -- claimed under a lease
    'retryable',   -- an attempt failed; waiting for its backoff run_at
    'completed',   -- finished successfully
    'failed',      -- the handler reported a permanent failure (no retry)
    'cancelled',   -- cancelled by the handler or an operator
    'discarded'    -- attempts exhausted, or discarded by an operator (dead letter)
);

CREATE TABLE queues (
    name        text PRIMARY KEY CHECK (name <> '' AND length(name) <= 128),
    paused      boolean NOT NULL DEFAULT false,
    paused_at   timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    id                uuid PRIMARY KEY,
    queue             text NOT NULL CHECK (queue <> '' AND length(queue) <= 128),
    kind              text NOT NULL CHECK (kind <> '' AND length(kind) <= 128),
    args              jsonb NOT NULL DEFAULT '{}'::jsonb,
    state             job_state NOT NULL,
    priority          smallint NOT NULL DEFAULT 0,
    attempt           integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts      integer NOT NULL DEFAULT 20 CHECK (max_attempts >= 1),
    timeout_ms        integer CHECK (timeout_ms IS NULL OR timeout_ms > 0),
    run_at            timestamptz NOT NULL,
    unique_key        text,
    workflow_id       uuid,
    workflow_step     text,
    lease_owner       text,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    last_error        text,
    created_at        timestamptz NOT NULL,
    attempted_at      timestamptz,
    finished_at       timestamptz,
    completed_by      text,
    -- A running job always holds a full lease; nothing else holds one.
    CONSTRAINT jobs_lease_iff_running CHECK (
        (state = 'running') = (lease_token IS NOT NULL AND lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)
    ),
    CONSTRAINT jobs_attempts_bounded CHECK (attempt <= max_attempts)
) WITH (fillfactor = 80);  -- room on the page keeps heartbeats HOT updates

CREATE INDEX jobs_claim ON jobs (queue, priority, run_at, id) WHERE state = 'available';
CREATE INDEX jobs_due ON jobs (run_at) WHERE state IN ('scheduled', 'retryable');
-- lease_owner never changes during an attempt, so heartbeats (which only move
-- lease_expires_at) do not touch this index and can stay HOT.
CREATE INDEX jobs_running ON jobs (lease_owner) WHERE state = 'running';
CREATE UNIQUE INDEX jobs_unique_key ON jobs (unique_key) WHERE unique_key IS NOT NULL;
CREATE INDEX jobs_workflow ON jobs (workflow_id) WHERE workflow_id IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_state_created ON jobs (state, created_at DESC);

-- One row per attempt that did not end in success: the error, the worker and
-- the timings. The successful attempt is described by the job row itself
-- (attempted_at, finished_at, completed_by).
CREATE TABLE job_attempts (
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    worker       text NOT NULL,
    -- What the attempt led to. Snoozes and shutdown releases give the attempt
    -- back (the counter is decremented), so they leave no row here.
    outcome      text NOT NULL CHECK (outcome IN ('retry', 'failed', 'cancelled', 'discarded', 'lease_expired')),
    error        text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
