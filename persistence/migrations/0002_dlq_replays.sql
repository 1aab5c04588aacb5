-- Dead letters re-driven by `eco2 dlq replay`: a record is replayed once unless --force.

CREATE TABLE dlq_replays (
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    job_id          text,
    target_topic    text NOT NULL,
    edited          boolean NOT NULL DEFAULT false,
    replays         integer NOT NULL DEFAULT 1,
    replayed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, kafka_partition, kafka_offset)
);
