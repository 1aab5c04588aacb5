"""The scan API: the producer of scan jobs."""
