-- Durable cron: schedules and the tick ledger.
--
-- Contract rules 1 and 5: every tick of a schedule is a row of `cron_ticks`
-- with a unique (schedule, fire_at), inserted in the same transaction as the
-- job it starts, so a tick fires at most once whatever the number of
-- scheduler replicas, and missed ticks are caught up from `next_fire_at` on
-- restart according to the schedule's catch-up policy.
--
-- Schedulers find due schedules through `cron_schedules_due` (partial on
-- enabled rows) and lock them `FOR UPDATE SKIP LOCKED`, so replicas share the
-- work instead of queueing behind each other.

CREATE TABLE cron_schedules (
    name                  text PRIMARY KEY CHECK (name <> '' AND length(name) <= 128),
    -- As given (5-field Unix cron, or the cron crate's 6/7-field form with seconds).
    expression            text NOT NULL CHECK (expression <> ''),
    -- IANA time zone the expression is evaluated in (e.g. 'Europe/Paris').
    timezone              text NOT NULL DEFAULT 'UTC',
    -- What to do with ticks missed while no scheduler ran (or while paused).
    catch_up              text NOT NULL CHECK (catch_up IN ('all', 'latest', 'skip')),
    -- For catch_up = 'all': how far back missed ticks are still fired.
    catch_up_window_secs  integer NOT NULL DEFAULT 3600 CHECK (catch_up_window_secs >= 0),
    -- 'skip': no new job while the previous tick's job is unfinished.
    overlap               text NOT NULL CHECK (overlap IN ('skip', 'allow')),
    -- The job each tick enqueues.
    job_kind              text NOT NULL CHECK (job_kind <> '' AND length(job_kind) <= 128),
    job_args              jsonb NOT NULL DEFAULT '{}'::jsonb,
    job_queue             text NOT NULL DEFAULT 'default' CHECK (job_queue <> '' AND length(job_queue) <= 128),
    job_max_attempts      integer NOT NULL DEFAULT 20 CHECK (job_max_attempts >= 1),
    enabled               boolean NOT NULL DEFAULT true,
    -- The next tick not yet handled; NULL when the expression never fires again.
    next_fire_at          timestamptz,
    -- The last tick that started a job (scheduled or manual), and that job.
    last_fire_at          timestamptz,
    last_job_id           uuid,
    paused_at             timestamptz,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL
);

CREATE INDEX cron_schedules_due ON cron_schedules (next_fire_at)
    WHERE enabled AND next_fire_at IS NOT NULL;

-- One row per handled tick. `job_id` is not a foreign key: finished jobs are
-- pruned while the tick ledger is kept.
CREATE TABLE cron_ticks (
    schedule       text NOT NULL REFERENCES cron_schedules (name) ON DELETE CASCADE ON UPDATE CASCADE,
    fire_at        timestamptz NOT NULL,
    job_id         uuid,
    outcome        text NOT NULL CHECK (outcome IN ('enqueued', 'skipped_overlap', 'skipped_catchup', 'manual')),
    -- For 'skipped_catchup' rows: every fire time in [fire_at, skipped_until)
    -- was dropped by the catch-up policy (one row per gap, not per tick).
    skipped_until  timestamptz,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (schedule, fire_at),
    CONSTRAINT cron_ticks_job_iff_started CHECK (
        (job_id IS NOT NULL) = (outcome IN ('enqueued', 'manual'))
    ),
    CONSTRAINT cron_ticks_range_iff_catchup CHECK (
        (skipped_until IS NOT NULL) = (outcome = 'skipped_catchup')
    )
);

CREATE INDEX cron_ticks_created ON cron_ticks (created_at DESC);
