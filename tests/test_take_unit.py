"""streams/take.py copies Faust's `Stream.take_events` with one change and drives the same Stream
internals: these pins fail when a faust-streaming upgrade moves them (the behaviour is covered by
the router's integration tests, tests/test_router.py)."""

from __future__ import annotations

import inspect

from faust.streams import Stream, _tracks_buffer_agen


def test_the_stream_internals_take_after_first_drives_are_still_upstreams() -> None:
    for name in ("_enable_passive", "add_processor", "ack", "wait_for_stopped", "crash"):
        assert callable(getattr(Stream, name, None)), name
    assert callable(_tracks_buffer_agen)
    upstream = inspect.getsource(Stream.take_events)
    # What the copy does the same way: acks off while a batch fills, the passive channel, and the
    # buffer processor removed from the instance's `_processors` at the end.
    for line in (
        "self.enable_acks = False",
        "self._enable_passive(",
        "self._processors.remove(add_to_buffer)",
        "await self.wait_for_stopped(",
    ):
        assert line in upstream, line


def test_upstream_take_events_still_cuts_batches_on_a_clock() -> None:
    """The reason for the copy (issue 19): upstream waits `within` whether or not an event came.
    When it waits for the first event itself, streams/take.py can go."""
    upstream = inspect.getsource(Stream.take_events)
    assert "timeout = want_seconds(within)" in upstream
