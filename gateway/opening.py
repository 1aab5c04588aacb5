"""Opening a stream, decided step by step: who asks, what the view knows, what to answer.

`events` in gateway/app.py runs these in order; each is small enough to test alone:
- `caller`: the user from X-User-ID, the stream token, or (development only) `?user=`;
- `settle`: a snapshot of the job once the view vouches for its history (the view is whole, or
  a newest-first rebuild has brought the job back from its first event) and the job is known
  (or the time is up);
- `verdict`: stream it, 204 (finished and fully delivered) or 404 (unknown, or not yours).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import view
from contract import identity, stream_token
from contract.settings import Settings

from . import openapi
from .hub import Item, Subscriber


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What opening a stream needs to know, read in one round trip (`Gateway.snapshot`)."""

    view_ready: bool  # the view vouches for this job's history (whole, or the job's part of it)
    owner: view.Owner | None  # None: unknown job
    history: list[Item]


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    detail: str


def caller(
    s: Settings, job_id: str, header_user: str | None, token: str | None, query_user: str | None
) -> str | Refusal:
    """The user who opens `job_id`'s stream, or why not (before Redis sees anything)."""
    uid = header_user
    if not uid and token is not None:
        try:
            uid = stream_token.verify(s, token, job_id).user_id
        except stream_token.InvalidToken as exc:
            return Refusal(401, f"invalid stream token: {exc}")
    if not uid and s.gateway_allow_user_query:
        uid = query_user  # development only (ECO2_GATEWAY_ALLOW_USER_QUERY)
    if not uid:
        return Refusal(401, "missing X-User-ID or stream token")
    if why := identity.problem(uid, s.max_user_id_len):
        return Refusal(400, f"the user id {why}")
    if len(job_id) > openapi.MAX_JOB_ID_LEN:
        return Refusal(404, "job not found")
    return uid


def last_seq(value: str | None) -> int:
    """Last-Event-ID as a seq (anything else: from the start)."""
    try:
        return max(int(value or 0), 0)
    except ValueError:
        return 0


class Reads(Protocol):
    """What `settle` needs of the gateway."""

    async def snapshot(self, job_id: str, after: int) -> Snapshot: ...

    async def view_changed(self, timeout_s: float) -> None: ...


async def settle(
    gw: Reads,
    sub: Subscriber,
    job_id: str,
    last: int,
    view_wait_s: float,
    unknown_job_wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    first: Snapshot | None = None,
) -> Snapshot | None:
    """The job's snapshot once it can be trusted; None when the view could not vouch for the job's
    history for `view_wait_s` (lost, or rebuilding and the job not back yet: answer 503, never a
    partial history served as whole). `first`: a snapshot already read (with the stream's lease,
    `gateway/first_read.py`), read after `sub` was subscribed.

    A job just submitted may reach Redis a moment after its POST: an unknown job is looked up
    again whenever something arrives on `sub` (subscribed before the first read, so nothing
    published meanwhile is missed), for at most `unknown_job_wait_s`."""
    snap = first if first is not None else await gw.snapshot(job_id, last)
    view_deadline = clock() + view_wait_s
    while not snap.view_ready:
        left = view_deadline - clock()
        if left <= 0:
            return None
        await gw.view_changed(left)
        snap = await gw.snapshot(job_id, last)
    if snap.owner is None:
        deadline = clock() + unknown_job_wait_s
        while snap.owner is None and clock() < deadline:
            await sub.wait(deadline - clock())
            sub.drain()  # whatever came live is in the history read next
            sub.resync = False
            snap = await gw.snapshot(job_id, last)
    return snap


Verdict = Literal["stream", "finished", "unknown"]


def verdict(snap: Snapshot, uid: str, last: int) -> Verdict:
    """`unknown` (404) for a job the view does not know and for someone else's (the same answer:
    a job id reveals nothing); `finished` (204, EventSource stops) when the job has ended and the
    client has its last event; else `stream`."""
    owner = snap.owner
    if owner is None or owner.user_id != uid:
        return "unknown"
    if owner.finished and last >= owner.seq:
        return "finished"
    return "stream"
