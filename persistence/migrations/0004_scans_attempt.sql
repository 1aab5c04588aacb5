-- Attempts (issue 22): a dead letter re-driven by `eco2 dlq replay` is a new attempt of its job;
-- the row keeps the attempt that ended so, and a later attempt's outcome replaces a failure
-- (persistence/store.py: ON CONFLICT ... DO UPDATE WHERE the row failed and the attempt is later).
-- Additive: writers of the previous version insert without it (attempt 0).

ALTER TABLE scans ADD COLUMN attempt integer NOT NULL DEFAULT 0;
