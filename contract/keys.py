"""Redis key names. Redis is a cache derived from the Kafka log; these are its only spellings."""

from __future__ import annotations


def state(job_id: str) -> str:
    """Hash: latest state of a job (seq, stage, status, progress, owner, result)."""
    return f"scan:state:{job_id}"


def history(job_id: str) -> str:
    """Sorted set of a job's events scored by seq, for catch-up on (re)connect."""
    return f"scan:history:{job_id}"


def idempotency(user_id: str, key: str) -> str:
    """Per-user idempotency key -> job_id and the request's fingerprint.

    The user id is length-prefixed, so no (user, key) pair spells another's entry: with a plain
    `{user}:{key}`, user `a:b` + key `c` and user `a` + key `b:c` shared one key."""
    return f"scan:idem:{len(user_id)}:{user_id}:{key}"


def shard_channel(shard: int) -> str:
    """Pub/sub channel of one events shard; a gateway subscribes to all shards on one connection.
    Each message is `live_message`: the router publishes one per shard per apply-script call."""
    return f"scan:live:{shard}"


# A message on a shard channel: one or more event JSONs (the history entries, as stored), in the
# order they were applied, joined by a newline. Compact JSON never holds a raw newline (JSON
# escapes control characters in strings), so the split is exact. Written by the apply script
# (view/state.py), read by the gateway (gateway/shard_feed.py); a one-event message is the event
# JSON alone, the format before messages carried batches. Upgrade the gateways before the router.
LIVE_SEPARATOR = b"\n"


def live_message(events: list[bytes]) -> bytes:
    """A shard channel message of `events` (what the apply script's PUBLISH spells in Lua)."""
    return LIVE_SEPARATOR.join(events)


def live_events(message: bytes) -> list[bytes]:
    """The events of one shard channel message, in order."""
    return message.split(LIVE_SEPARATOR)


def memo(job_id: str, name: str, attempt: int = 0) -> str:
    """What a stage already produced for one attempt of a job, so a redelivered stage re-emits
    identical bytes (attempt 0 keeps the keys it had before attempts existed)."""
    return f"scan:memo:{job_id}:{name}" if attempt == 0 else f"scan:memo:{job_id}:a{attempt}:{name}"


# The view marker: Redis is a view of `scan.events`; the router writes this hash with the view
# (status ready|rebuilding, epoch, Redis run_id; order=newest-first while a flushed view is
# replayed backwards, so readers may serve a job whose queued event is back) so that anyone can
# tell the view was lost (FLUSHALL, a restart without persistence, an empty replica): the marker
# is gone with it.
VIEW = "scan:view"
# Held (with a TTL, renewed) by the one router process rebuilding the view.
VIEW_REBUILDER = "scan:view:rebuilder"
# The router group's committed `scan.events` offsets, written while the view is ready: the view
# holds every event below them. A restart that brings the view back from the AOF brings this
# back with it (the AOF is sequential), so the rebuild replays from here, not the whole window.
VIEW_CHECKPOINT = "scan:view:checkpoint"


# Per-user quotas (quota/limits.py). The user id is length-prefixed like the idempotency key's.
def quota_scans(user_id: str) -> str:
    """Hash: the user's scan token bucket (tokens, ms timestamp of the last refill)."""
    return f"scan:quota:{len(user_id)}:{user_id}:scans"


def quota_inflight(user_id: str) -> str:
    """Sorted set: the user's jobs in flight, scored by the ms their lease ends; the router removes
    a job when it applies its terminal event (view/state.py)."""
    return f"scan:quota:{len(user_id)}:{user_id}:inflight"


def quota_streams(user_id: str) -> str:
    """Sorted set: the user's open SSE streams (one lease per stream, any gateway), scored by the
    ms the lease ends unless its gateway renews it."""
    return f"scan:quota:{len(user_id)}:{user_id}:streams"
