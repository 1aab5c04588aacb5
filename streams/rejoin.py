"""A Faust consumer must rejoin its group after a long rebalance (a broker outage of minutes).

aiokafka (0.14) will not rejoin a group once its fetcher has been idle for `max_poll_interval`
(`GroupCoordinator.ensure_active_group`: "We will not attempt rejoin if there is no activity on
consumer", aio-libs/aiokafka #1187). The check runs after the revoke callback, and its idle
clock only restarts when the application fetches. A plain aiokafka loop keeps calling getmany()
through a rebalance, so its clock keeps restarting; Faust does not: its revoke callback stops
the flow, and its fetcher waits for the flow to resume, which only the next assignment does.
So once a rebalance lasts longer than `broker_max_poll_interval` (30 s here) counted from the
last fetch (a broker outage of minutes: the member's session expired, the drain loop sat in a
commit, the revoke waited for in-flight work), the consumer neither fetches nor rejoins, for
ever: aiokafka sleeps `retry_backoff` and checks again, Faust waits for an assignment. Seen in
the stalled router and stage workers: coordinator generation -1, reassignment in progress,
fetcher idle for minutes, Faust's `flow_active` False and its drain loop waiting for
`can_resume_flow`.

The patch pauses the idle clock while a reassignment is in progress (aiokafka's own fetch
blocks then too, so a polling application would read 0 as well) and restarts it when the
assignment lands, so the application gets a full `max_poll_interval` to fetch from its new
partitions. A member whose application really stopped fetching still leaves the group after
`max_poll_interval` from its assignment (the heartbeat routine's check, which this keeps).
Installed by `streams.app.create_app`, so only in Faust processes. `tests/test_rejoin.py`
fails when aiokafka changes what this relies on.
"""

from __future__ import annotations

import time
from typing import Any

from aiokafka.consumer.subscription_state import SubscriptionState


def install() -> None:
    """Patch aiokafka's SubscriptionState; idempotent."""
    cls: Any = SubscriptionState
    if getattr(cls, "_eco2_rejoin", False):
        return
    original = cls.fetcher_idle_time
    idle, assign = original.fget, cls.assign_from_subscribed

    def fetcher_idle_time(self: Any) -> float:
        if self._subscription is not None and self.reassignment_in_progress:
            return 0
        result: float = idle(self)
        return result

    def assign_from_subscribed(self: Any, assignment: Any) -> None:
        assign(self, assignment)
        if self._fetch_count == 0:  # the clock restarts with the new assignment
            self._last_fetch_ended = time.monotonic()

    cls.fetcher_idle_time = property(fetcher_idle_time)
    cls.assign_from_subscribed = assign_from_subscribed
    cls._eco2_rejoin_originals = (original, assign)  # tests/test_rejoin.py runs aiokafka without it
    cls._eco2_rejoin = True
