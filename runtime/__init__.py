"""What every running process exports about itself: consumer health (/health, /ready) and
process metrics (asyncio tasks, GC pauses, the /metrics route)."""
