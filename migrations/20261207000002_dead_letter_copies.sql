-- Dead letters are durable in Postgres first: ingress records the letter (and
-- lets the partition move on) without waiting for the dead-letter topic. The
-- topic copy is published afterwards from this row, outbox-style, retried
-- with backoff until the topic accepts it; failures stay visible here.
--
-- payload_size / payload_sha256 describe the message as received; when it is
-- larger than the ingress' dead-letter payload limit only its first bytes are
-- kept (payload_truncated).
ALTER TABLE dead_letters
    ADD COLUMN payload_size      integer,
    ADD COLUMN payload_sha256    bytea,
    ADD COLUMN payload_truncated boolean NOT NULL DEFAULT false,
    -- The topic the copy goes to; NULL: no copy is owed.
    ADD COLUMN copy_topic        text,
    ADD COLUMN copy_state        text NOT NULL DEFAULT 'none'
        CHECK (copy_state IN ('none', 'pending', 'published')),
    ADD COLUMN copy_attempts     integer NOT NULL DEFAULT 0,
    ADD COLUMN copy_error        text,
    ADD COLUMN copy_next_at      timestamptz,
    ADD COLUMN copy_published_at timestamptz;

CREATE INDEX dead_letters_copy_due ON dead_letters (copy_next_at) WHERE copy_state = 'pending';
