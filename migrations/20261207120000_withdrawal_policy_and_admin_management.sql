-- Withdrawal policy overrides, multi-approver four-eyes, admin ↔ user links,
-- and the `security` role that manages admins, API keys and the policy.
--
-- The effective withdrawal policy of an asset is its row here when an admin
-- set one through the admin API (audited, with a reason), otherwise the
-- process configuration (`LEDGERFLOW_WITHDRAWAL_POLICY`). A row always holds
-- the whole policy of its asset (NULL: no threshold / no limit).
CREATE TABLE withdrawal_policies (
    asset                      text PRIMARY KEY REFERENCES assets (code),
    approval_threshold         numeric CHECK (approval_threshold >= 0),
    second_approval_threshold  numeric CHECK (second_approval_threshold >= 0),
    daily_limit                numeric CHECK (daily_limit > 0),
    updated_by                 uuid NOT NULL REFERENCES admins (id),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    -- Above the second threshold two approvers are needed, so the first
    -- threshold must exist and be no higher.
    CONSTRAINT withdrawal_policies_thresholds CHECK (
        second_approval_threshold IS NULL
        OR (approval_threshold IS NOT NULL AND approval_threshold <= second_approval_threshold))
);

-- How many distinct approvers a withdrawal that requires approval needs
-- (decided by its validate step from the policy of that moment).
ALTER TABLE withdrawals
    ADD COLUMN approvals_required smallint NOT NULL DEFAULT 1
        CHECK (approvals_required BETWEEN 1 AND 2);

-- One row per approver and withdrawal: the primary key is the four-eyes
-- rule "no admin approves the same withdrawal twice", in SQL.
CREATE TABLE withdrawal_approvals (
    withdrawal_id  uuid NOT NULL REFERENCES withdrawals (id),
    admin_id       uuid NOT NULL REFERENCES admins (id),
    audit_id       uuid NOT NULL REFERENCES audit_log (id),
    approved_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (withdrawal_id, admin_id)
);

-- An admin may be linked to the user account of the same person; such an
-- approver may not approve that user's withdrawals.
ALTER TABLE admins ADD COLUMN user_id uuid REFERENCES users (id);
CREATE INDEX admins_user ON admins (user_id) WHERE user_id IS NOT NULL;

-- The `security` role manages admins, user API keys and the withdrawal policy.
ALTER TABLE admins DROP CONSTRAINT admins_role_check;
ALTER TABLE admins ADD CONSTRAINT admins_role_check
    CHECK (role IN ('viewer', 'operator', 'approver', 'security'));
ALTER TABLE audit_log DROP CONSTRAINT audit_log_admin_role_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_admin_role_check
    CHECK (admin_role IN ('viewer', 'operator', 'approver', 'security'));

-- The actor of `ledgerflow admin …` / `ledgerflow api-key …` (run by someone
-- with database access): audit rows need an admin. Disabled from birth, with
-- a hash no secret has, so it can never sign in.
INSERT INTO admins (id, name, role, credential_prefix, credential_hash, disabled_at)
VALUES ('00000000-0000-7000-8000-00000000c1c1', 'ledgerflow-cli', 'security',
        '000000000000', decode(repeat('00', 32), 'hex'), now());
