-- Idempotency records of the public API's POSTs (`Idempotency-Key` header).
--
-- One row per (user, key). The handler inserts the row FIRST, with
-- `ON CONFLICT DO NOTHING`, in the same transaction that starts the
-- workflow and stores the response; a concurrent request with the same key
-- waits on the row until that transaction ends, then reads the stored
-- response (or, if the first one rolled back, becomes the first itself).
-- `fingerprint` is the hex SHA-256 of method, path and canonical JSON body:
-- the same key with another fingerprint is refused (422).

CREATE TABLE idempotency_keys (
    user_id          uuid NOT NULL REFERENCES users (id),
    key              text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint      text NOT NULL CHECK (length(fingerprint) = 64),
    -- Set in the same transaction as the insert; never NULL once committed.
    response_status  smallint CHECK (response_status BETWEEN 100 AND 599),
    response_body    jsonb,
    -- The resource (workflow id) the request created, if any.
    resource_id      uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

-- Pruning old records (a retention job) scans by age.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
