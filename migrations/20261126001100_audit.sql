-- The admin audit log: one row per admin mutation (who, what, why), written
-- by the admin API in the SAME transaction as the change it describes, so a
-- change without its audit row (or an audit row for a change that rolled
-- back) cannot exist.
--
-- The admin's name and role are copied, not only referenced, so the row keeps
-- saying who did it with which rights even after the admin is renamed or its
-- role changes. Like the ledger, the log is append-only.

CREATE TABLE audit_log (
    id           uuid PRIMARY KEY,
    admin_id     uuid NOT NULL REFERENCES admins (id),
    admin_name   text NOT NULL,
    admin_role   text NOT NULL CHECK (admin_role IN ('viewer', 'operator', 'approver')),
    -- e.g. 'job.retry', 'jobs.bulk_cancel', 'queue.pause'
    action       text NOT NULL CHECK (action ~ '^[a-z][a-z0-9_.]{0,62}$'),
    -- e.g. 'job', 'queue', 'jobs' (a bulk action; target_id describes the filter)
    target_type  text NOT NULL CHECK (target_type ~ '^[a-z][a-z0-9_]{0,62}$'),
    target_id    text NOT NULL CHECK (length(target_id) BETWEEN 1 AND 200),
    -- Why: required, never blank.
    reason       text NOT NULL CHECK (length(btrim(reason)) BETWEEN 1 AND 1000),
    details      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX audit_log_created ON audit_log (created_at DESC, id DESC);
CREATE INDEX audit_log_target ON audit_log (target_type, target_id, created_at DESC);
CREATE INDEX audit_log_admin ON audit_log (admin_id, created_at DESC);

-- payments_append_only() is defined by the payments migration.
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION payments_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION payments_append_only();
