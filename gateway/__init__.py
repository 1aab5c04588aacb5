"""SSE gateway: streams a job's progress from Redis to the app, gap-free across reconnects."""
