-- The edges of the system: the inbox (deduplicated intake of Kafka messages and
-- webhooks), dead letters (poison messages with their error) and the
-- transactional outbox (domain events published to Kafka by the relay).

-- One row per accepted external event. `(source, dedupe_key)` is unique: the
-- intake inserts with ON CONFLICT DO NOTHING in the same transaction as the
-- event's effect, so a redelivered or re-sent event is applied once.
-- Kafka ingress: source = 'kafka:<topic>', dedupe_key = 'id:<business id>' when
-- the message carries one, else 'offset:<topic>/<partition>/<offset>'.
CREATE TABLE inbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source       text NOT NULL CHECK (source <> '' AND length(source) <= 256),
    dedupe_key   text NOT NULL CHECK (dedupe_key <> '' AND length(dedupe_key) <= 512),
    topic        text,
    "partition"  integer,
    "offset"     bigint,
    business_id  text,
    payload      bytea,
    headers      jsonb NOT NULL DEFAULT '{}'::jsonb,
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    CONSTRAINT inbox_source_dedupe_key UNIQUE (source, dedupe_key)
);

CREATE INDEX inbox_unprocessed ON inbox (received_at) WHERE processed_at IS NULL;

-- Messages that could not be applied (undecodable, invalid, or failing every
-- attempt). Also published to the dead-letter topic; kept here for operators,
-- who can redrive them (`redriven_at`).
CREATE TABLE dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source       text NOT NULL,
    topic        text,
    "partition"  integer,
    "offset"     bigint,
    key          bytea,
    payload      bytea,
    headers      jsonb NOT NULL DEFAULT '{}'::jsonb,
    error        text NOT NULL,
    attempts     integer NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    redriven_at  timestamptz
);

-- One dead letter per Kafka message, so a consumer that dies after recording
-- it and before committing its offset does not record it twice.
CREATE UNIQUE INDEX dead_letters_message ON dead_letters (topic, "partition", "offset")
    WHERE topic IS NOT NULL AND redriven_at IS NULL;
CREATE INDEX dead_letters_pending ON dead_letters (created_at) WHERE redriven_at IS NULL;

-- Domain events written by business transactions, published by the relay in
-- id order per (topic, key).
CREATE TABLE outbox (
    id           uuid PRIMARY KEY,                 -- UUID v7: sorts by creation
    topic        text NOT NULL CHECK (topic <> '' AND length(topic) <= 249),
    key          text,
    headers      jsonb NOT NULL DEFAULT '{}'::jsonb,
    payload      bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_unpublished_key ON outbox (topic, key, id) WHERE published_at IS NULL;
