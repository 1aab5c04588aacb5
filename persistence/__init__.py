"""Durable persistence: the batched Postgres writer, its migrations and the stored-result reader.

`python -m persistence` runs the writer (consumer group eco2-writer on scan.events); see writer.py
for its delivery guarantees and `eco2 dlq --help` for re-driving what it could not store.
"""
