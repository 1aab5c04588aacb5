"""Faust's Monitor sensor without its per-event statistics (issue 19).

Faust adds a `Monitor` sensor to every app, and calls it for every message and event: counters,
per-topic dicts, a label per stream and per actor task (`str()` of a Faust service), event
runtimes in a deque, all behind a dict comprehension over the app's sensors. Nothing here reads
those statistics (Faust's web is off; the metrics come from prometheus-client). Faust itself
reads one thing: `stream_inbound_time`, when each partition's stream last took an event, for its
slow-processing warnings (`verify_event_path`). `InboundOnly` keeps that, per event, and nothing
else; the Monitor's other callbacks (commits, end offsets, rebalances) are Faust's as before.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from faust.sensors import Monitor


class InboundOnly(Monitor):
    """The app's Monitor, minus the per-message and per-event bookkeeping nobody reads."""

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        self.stream_inbound_time[tp] = monotonic()  # what Faust's slow-processing check reads
        return None

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None
