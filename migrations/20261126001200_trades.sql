-- The payments workflows' own tables: trades, withdrawals, notifications.
--
-- Each row is the domain view of one workflow instance (`id` = the workflow
-- id, or the notification's dedupe id); the workflow's steps write it in
-- their lease-fenced transactions, so a row's status always matches the
-- step journal. Money columns are unconstrained `numeric` checked against the
-- asset's scale in Rust (and by the ledger when money actually moves).

CREATE TABLE trades (
    id                 uuid PRIMARY KEY,
    user_id            uuid NOT NULL REFERENCES users (id),
    side               text NOT NULL CHECK (side IN ('buy', 'sell')),
    base_asset         text NOT NULL REFERENCES assets (code),
    quote_asset        text NOT NULL REFERENCES assets (code),
    base_amount        numeric NOT NULL CHECK (base_amount > 0),
    limit_price        numeric NOT NULL CHECK (limit_price > 0),
    status             text NOT NULL CHECK (status IN (
                           'validated', 'held', 'placed', 'filled', 'settled',
                           'rejected', 'cancelled')),
    hold_reference     text,
    exchange_order_id  text,
    error              text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (base_asset <> quote_asset)
);

CREATE INDEX trades_user ON trades (user_id, created_at DESC);

CREATE TABLE withdrawals (
    id                 uuid PRIMARY KEY,
    user_id            uuid NOT NULL REFERENCES users (id),
    asset              text NOT NULL REFERENCES assets (code),
    amount             numeric NOT NULL CHECK (amount > 0),
    address            text NOT NULL CHECK (length(address) BETWEEN 1 AND 200),
    status             text NOT NULL CHECK (status IN (
                           'validated', 'held', 'awaiting_approval', 'approved',
                           'submitted', 'completed', 'rejected', 'cancelled')),
    requires_approval  boolean NOT NULL DEFAULT false,
    -- The admin who filed it on the user's behalf, if any (may not approve it).
    requested_by       uuid REFERENCES admins (id),
    approved_by        uuid REFERENCES admins (id),
    approved_at        timestamptz,
    hold_reference     text,
    exchange_withdrawal_id text,
    tx_hash            text,
    error              text,
    requested_at       timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- The per-user daily limit sums a user's withdrawals of the day.
CREATE INDEX withdrawals_user_day ON withdrawals (user_id, asset, requested_at);

CREATE TABLE notifications (
    id           text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 300),
    user_id      uuid NOT NULL REFERENCES users (id),
    channel      text NOT NULL CHECK (channel IN ('email', 'push')),
    template     text NOT NULL CHECK (length(template) BETWEEN 1 AND 100),
    payload      jsonb NOT NULL DEFAULT '{}',
    status       text NOT NULL CHECK (status IN ('pending', 'sent', 'rejected')),
    provider_message_id text,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz
);

CREATE INDEX notifications_user ON notifications (user_id, created_at DESC);
