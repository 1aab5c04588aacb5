-- Finished scans (completed or failed) and the characters they granted.
-- Written only by the persistence writer, idempotently: one row per job, one per (user, character).

CREATE TABLE scans (
    job_id         text PRIMARY KEY,
    user_id        text NOT NULL,
    status         text NOT NULL CHECK (status IN ('completed', 'failed')),
    image_url      text NOT NULL,
    classification jsonb,
    rules_key      text,
    rules          jsonb,
    answer         jsonb,
    reward         jsonb,
    error          text,
    failed_stage   text,
    timings        jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL,
    finished_at    timestamptz NOT NULL
);

-- "My scans" lists, newest first.
CREATE INDEX scans_user_finished ON scans (user_id, finished_at DESC);

-- A character is owned once per user; job_id/acquired_at are those of the earliest granting scan.
CREATE TABLE character_ownership (
    user_id        text NOT NULL,
    character_code text NOT NULL,
    job_id         text NOT NULL REFERENCES scans (job_id),
    acquired_at    timestamptz NOT NULL,
    PRIMARY KEY (user_id, character_code)
);
