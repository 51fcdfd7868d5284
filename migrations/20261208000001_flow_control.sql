-- Flow control: per-key concurrency limits, durable rate limits, fair claims
-- across keys, priority aging, debounce and throttle. Decision 0010 explains
-- the design; the short version:
--
--   * A concurrency slot IS a running job row (or, for a workflow-wide key, an
--     admitted unfinished workflow). Nothing is counted separately, so nothing
--     can drift: a slot frees when its row leaves `running` (finish, or the
--     reaper after the lease expired) and never otherwise.
--   * Claims of a controlled queue take a transaction-scoped advisory lock per
--     key (in a fixed order), and only then count the holders with a fresh
--     snapshot, so two claimers can never both see the last free slot.
--   * Rate limits are token buckets in `flow_buckets`, refilled from the
--     database's clock only (never a worker's), under the same key locks.
--   * Fairness is an ordering: each keyed job gets `fair_seq`, its key's
--     previous sequence plus a step (1000 / the key's weight), or the queue's
--     head if the key has nothing waiting. Claims walk (priority, fair_seq,
--     run_at), which alternates between keys.

-- The limits, keyed by an exact flow key ('user:42'), a class of keys
-- ('user:*': every key up to its last ':'), or a queue ('queue:<name>', the
-- key-less limit of a whole queue). Declared in code (source 'code', only
-- inserted when missing) and changed at runtime by admins (source 'admin',
-- which code declarations never overwrite).
CREATE TABLE flow_limits (
    key             text PRIMARY KEY CHECK (key <> '' AND length(key) <= 256),
    -- At most this many holders at once; 0 stops the key; NULL: no limit.
    concurrency     integer CHECK (concurrency IS NULL OR concurrency >= 0),
    -- Token bucket: holds up to rate_capacity weight, refilled by rate_refill
    -- weight every rate_window_ms (continuously). All three or none.
    rate_capacity   bigint CHECK (rate_capacity IS NULL OR rate_capacity > 0),
    rate_refill     bigint CHECK (rate_refill IS NULL OR rate_refill > 0),
    rate_window_ms  bigint CHECK (rate_window_ms IS NULL OR rate_window_ms > 0),
    -- Share of claims relative to other keys (fairness).
    fair_weight     integer NOT NULL DEFAULT 1 CHECK (fair_weight BETWEEN 1 AND 1000),
    source          text NOT NULL CHECK (source IN ('code', 'admin')),
    reason          text,
    updated_by      text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT flow_limits_rate_complete CHECK (
        (rate_capacity IS NULL) = (rate_refill IS NULL)
        AND (rate_refill IS NULL) = (rate_window_ms IS NULL))
);

-- A rate-limited key's bucket as of `at` (the database's time), in thousandths
-- of a weight: its level, and what it owes to deferred callers (weight promised
-- to them, decaying at the refill rate). New callers leave what is owed, so the
-- deferred take their turns one after another instead of all waking at once;
-- every use is still paid from the level at the moment it is admitted. Written
-- only under the key's advisory lock.
CREATE TABLE flow_buckets (
    key       text PRIMARY KEY,
    millis    bigint NOT NULL CHECK (millis >= 0),
    owed      bigint NOT NULL DEFAULT 0 CHECK (owed >= 0),
    at        timestamptz NOT NULL
);

-- A deferred job (or step call) whose turn will come: when it comes back it
-- takes from the level before new callers. No foreign key to jobs: a step's call
-- reserves while the step's own transaction holds its job row, and the key-share
-- lock of a foreign-key check would wait for that transaction. The pruner drops
-- reservations whose job is gone.
CREATE TABLE flow_reservations (
    job_id      uuid NOT NULL,
    key         text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, key)
);

-- Deferrals per key, for operators and metrics (a job or call that found its
-- bucket empty). One upsert per deferring claim, not per job.
CREATE TABLE flow_deferrals (
    key       text PRIMARY KEY,
    deferred  bigint NOT NULL DEFAULT 0,
    last_at   timestamptz NOT NULL
);

-- A queue is claimed through the controlled path once any of its jobs has a
-- flow key, a rate key, or a workflow-wide key, or it has a queue limit. The
-- flag is set in the same statement that inserts such a job, so a claimer
-- that sees the job sees the flag.
ALTER TABLE queues ADD COLUMN flow boolean NOT NULL DEFAULT false;

ALTER TABLE jobs
    ADD COLUMN flow_key      text CHECK (flow_key IS NULL OR (flow_key <> '' AND length(flow_key) <= 256)),
    ADD COLUMN rate_key      text CHECK (rate_key IS NULL OR (rate_key <> '' AND length(rate_key) <= 256)),
    ADD COLUMN rate_weight   integer CHECK (rate_weight IS NULL OR rate_weight > 0),
    ADD COLUMN fair_seq      bigint NOT NULL DEFAULT 0,
    ADD COLUMN debounce_key  text,
    ADD COLUMN throttle_key  text,
    ADD CONSTRAINT jobs_rate_pair CHECK ((rate_key IS NULL) = (rate_weight IS NULL));

-- The claim order is (priority, fair_seq, run_at, id); without keys every
-- fair_seq is the queue's head (0 when no keyed job ever waited), so the order
-- is the old (priority, run_at, id).
DROP INDEX jobs_claim;
CREATE INDEX jobs_claim ON jobs (queue, priority, fair_seq, run_at, id) WHERE state = 'available';
-- Holders of a key, counted under its lock.
CREATE INDEX jobs_flow_running ON jobs (flow_key) WHERE state = 'running' AND flow_key IS NOT NULL;
-- A key's last waiting sequence (for the next job's fair_seq) and its waiters.
CREATE INDEX jobs_flow_waiting ON jobs (queue, flow_key, fair_seq)
    WHERE state = 'available' AND flow_key IS NOT NULL;
-- At most one pending (not yet started) job per debounce key.
CREATE UNIQUE INDEX jobs_debounce ON jobs (debounce_key)
    WHERE debounce_key IS NOT NULL AND state IN ('scheduled', 'available');
CREATE INDEX jobs_throttle ON jobs (throttle_key, run_at) WHERE throttle_key IS NOT NULL;

-- A workflow-wide key: the workflow holds a slot of it from its first claimed
-- step until it finishes (withdrawals: one at a time per user).
ALTER TABLE workflows
    ADD COLUMN flow_key      text CHECK (flow_key IS NULL OR (flow_key <> '' AND length(flow_key) <= 256)),
    ADD COLUMN flow_admitted boolean NOT NULL DEFAULT false;
CREATE INDEX workflows_flow_held ON workflows (flow_key)
    WHERE flow_admitted AND finished_at IS NULL;
CREATE INDEX workflows_flow_waiting ON workflows (flow_key)
    WHERE NOT flow_admitted AND finished_at IS NULL AND flow_key IS NOT NULL;

-- The limit row that applies to `key`: its own, else its class's
-- ('user:42' → 'user:*').
CREATE FUNCTION flow_class(key text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN strpos(key, ':') > 0 THEN regexp_replace(key, '[^:]*$', '*') END;

-- Leading debounce: was a job with this key enqueued within the window?
CREATE INDEX jobs_debounce_recent ON jobs (debounce_key, created_at) WHERE debounce_key IS NOT NULL;
