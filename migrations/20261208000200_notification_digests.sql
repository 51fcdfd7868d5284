-- Notification digests: an event's notification row enqueued for a digest (`batched`) waits for
-- its user's debounced digest workflow, which takes every such row of the user (`digest_id` =
-- the digest's provider message id) and sends them as one message.
ALTER TABLE notifications
    ADD COLUMN batched boolean NOT NULL DEFAULT false,
    ADD COLUMN digest_id text CHECK (length(digest_id) BETWEEN 1 AND 300);

CREATE INDEX notifications_undigested ON notifications (user_id, created_at)
    WHERE batched AND digest_id IS NULL;
CREATE INDEX notifications_digest ON notifications (digest_id) WHERE digest_id IS NOT NULL;
