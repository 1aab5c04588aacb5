"""The Redis view of `scan.events`: job state, history and live fan-out (`state`), the marker that
says whether the view is whole and its checkpoint (`marker`), and the Redis clients every
component opens. The API, the gateway and the router use it only through the names below."""

from .client import client, pooled_client, retry_options
from .marker import (
    MARKER_FIELDS,
    Claim,
    Reader,
    Status,
    checkpoint,
    current,
    interpret,
    mark_ready,
    read,
    run_id,
    status,
)
from .state import Owner, Snapshot, StateStore
from .stream_snapshot import SnapshotReader

__all__ = [
    "MARKER_FIELDS",
    "Claim",
    "Owner",
    "Reader",
    "Snapshot",
    "SnapshotReader",
    "StateStore",
    "Status",
    "checkpoint",
    "client",
    "current",
    "interpret",
    "mark_ready",
    "pooled_client",
    "read",
    "retry_options",
    "run_id",
    "status",
]
