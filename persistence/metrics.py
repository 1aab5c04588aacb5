"""Prometheus metrics of the Postgres writer (served on ECO2_METRICS_PORT, 9103 locally)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BATCH_SIZE = Histogram(
    "eco2_writer_batch_size",
    "records per flushed batch (all events, terminal or not)",
    buckets=(1, 2, 5, 10, 20, 30, 40, 50, 100, 200, 500),
)
FLUSH_SECONDS = Histogram(
    "eco2_writer_flush_seconds",
    "time from taking a batch to committing its offsets (retries included)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
ROWS = Counter("eco2_writer_rows_total", "rows inserted or updated", ["table"])
RECORDS = Counter("eco2_writer_records_total", "records consumed by outcome", ["outcome"])
RETRIES = Counter(
    "eco2_writer_retries_total",
    "retries: hold = Postgres/Kafka unavailable (position held), rejected = a row Postgres refused",
    ["kind"],
)
DEAD_LETTERS = Counter("eco2_writer_dead_letters_total", "records sent to scan.persistence.dlq", ["reason"])

# Present at 0 from the start (the dead-letter panel and alert read them before the first letter);
# the reasons persistence/records.py and writer.py give.
DEAD_LETTER_REASONS = ("not_json", "invalid_event", "invalid_result", "postgres_rejected", "unknown_version")
for _reason in DEAD_LETTER_REASONS:
    DEAD_LETTERS.labels(_reason)
