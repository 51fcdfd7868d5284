-- Durable trace context (docs/decisions/0011): the W3C `traceparent` of the span that
-- started a workflow, and of the span that enqueued a job, so that an attempt that runs
-- after a crash, a restart or a retry continues the original trace instead of starting a
-- new root. NULL when tracing was off for the writer. Nothing reads these columns but
-- tracing (and the admin API's trace id), so no index.
ALTER TABLE jobs ADD COLUMN traceparent text
    CHECK (traceparent IS NULL OR length(traceparent) <= 128);
ALTER TABLE workflows ADD COLUMN traceparent text
    CHECK (traceparent IS NULL OR length(traceparent) <= 128);
