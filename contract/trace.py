"""W3C trace context carried in the `traceparent` Kafka header of every message."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping

PATTERN = r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$"
_TRACEPARENT = re.compile(PATTERN)
HEADER = "traceparent"
# The job a model call is for (HTTP header of the stage workers' model requests): lets the model
# stand-in count calls per job, so `eco2 chaos --rollout` can prove no call was ever repeated.
JOB_HEADER = "X-Eco2-Job-Id"


def _span_id() -> str:
    """A random, non-zero span id. From `random`, as OpenTelemetry's own id generator does: ids
    need to be unique, not secret, and `os.urandom` is a system call per id (issue 19)."""
    return f"{random.getrandbits(64) or 1:016x}"


def new_traceparent() -> str:
    return f"00-{random.getrandbits(128) or 1:032x}-{_span_id()}-01"


def child_of(parent: str | None) -> str:
    """Continue the trace of `parent` with a new span id (a new trace when parent is invalid)."""
    m = _TRACEPARENT.match(parent or "")
    if not m:
        return new_traceparent()
    return f"00-{m.group(1)}-{_span_id()}-{m.group(3)}"


def trace_id(traceparent: str | None) -> str:
    m = _TRACEPARENT.match(traceparent or "")
    return m.group(1) if m else "-"


def from_headers(headers: Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None) -> str | None:
    """The traceparent of a consumed message (Faust gives a mapping, aiokafka a list of pairs)."""
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    for k, v in items:
        if k == HEADER:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def headers(traceparent: str) -> list[tuple[str, bytes]]:
    return [(HEADER, traceparent.encode())]
