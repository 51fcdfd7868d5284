-- Kafka consumer lag as the ingress processes last measured it, so that every /metrics endpoint
-- (the API's included, which consumes nothing) can export it: one row per consumer group and
-- partition, overwritten by whichever ingress process holds the partition, every lag interval.
CREATE TABLE kafka_consumer_lag (
    consumer_group   text NOT NULL,
    topic            text NOT NULL,
    "partition"      integer NOT NULL,
    high_watermark   bigint NOT NULL,
    "position"       bigint NOT NULL,
    lag              bigint NOT NULL CHECK (lag >= 0),
    measured_at      timestamptz NOT NULL,
    PRIMARY KEY (consumer_group, topic, "partition")
);
