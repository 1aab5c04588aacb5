"""Opening a stream (gateway/opening.py), step by step, on fakes: no Redis, no HTTP."""

from __future__ import annotations

import asyncio

from contract import stream_token
from contract.settings import Settings
from gateway.hub import Subscriber
from gateway.opening import Refusal, Snapshot, caller, last_seq, settle, verdict
from view import Owner

S = Settings(stream_token_secret="k" * 32)  # type: ignore[arg-type]


def test_caller_from_header_then_token_then_dev_query() -> None:
    token = stream_token.issue(S, "job1", "alice")
    assert caller(S, "job1", "bob", token, None) == "bob"  # the auth proxy's header wins
    assert caller(S, "job1", None, token, None) == "alice"
    assert caller(S, "job1", None, None, "carol") == Refusal(401, "missing X-User-ID or stream token")
    dev = S.model_copy(update={"gateway_allow_user_query": True})
    assert caller(dev, "job1", None, None, "carol") == "carol"


def test_caller_refusals() -> None:
    other_job = stream_token.issue(S, "job2", "alice")
    refused = caller(S, "job1", None, other_job, None)
    assert isinstance(refused, Refusal) and refused.status == 401 and "invalid stream token" in refused.detail
    forged = caller(S, "job1", None, "forged", None)
    assert isinstance(forged, Refusal) and forged.status == 401
    bad_user = caller(S, "job1", "a b", None, None)
    assert isinstance(bad_user, Refusal) and bad_user.status == 400
    assert caller(S, "j" * 500, "alice", None, None) == Refusal(404, "job not found")


def test_last_seq() -> None:
    assert [last_seq(v) for v in (None, "", "21", "-3", "abc")] == [0, 0, 21, 0, 0]


def snap(ready: bool = True, owner: Owner | None = None) -> Snapshot:
    return Snapshot(ready, owner, [])


ALICE = Owner("alice", 21, finished=False)
ALICE_DONE = Owner("alice", 51, finished=True)


def test_verdict() -> None:
    assert verdict(snap(owner=None), "alice", 0) == "unknown"
    assert verdict(snap(owner=ALICE), "bob", 0) == "unknown"  # someone else's: the same 404
    assert verdict(snap(owner=ALICE), "alice", 0) == "stream"
    assert verdict(snap(owner=ALICE_DONE), "alice", 41) == "stream"  # the last events still to send
    assert verdict(snap(owner=ALICE_DONE), "alice", 51) == "finished"


class FakeGateway:
    """Answers scripted snapshots in turn (the last one repeats); counts the waits."""

    def __init__(self, *snaps: Snapshot) -> None:
        self.snaps = list(snaps)
        self.reads = 0
        self.view_waits = 0

    async def snapshot(self, job_id: str, after: int) -> Snapshot:
        self.reads += 1
        return self.snaps.pop(0) if len(self.snaps) > 1 else self.snaps[0]

    async def view_changed(self, timeout_s: float) -> None:
        self.view_waits += 1
        await asyncio.sleep(min(timeout_s, 0.01))


async def test_settle_waits_for_the_view_then_answers() -> None:
    gw = FakeGateway(snap(False), snap(False), snap(True, ALICE))
    got = await settle(gw, Subscriber("job1", 8), "job1", 0, view_wait_s=5, unknown_job_wait_s=0)
    assert got is not None and got.owner == ALICE and gw.view_waits == 2


async def test_settle_gives_up_on_a_view_that_stays_lost() -> None:
    gw = FakeGateway(snap(False))
    assert await settle(gw, Subscriber("job1", 8), "job1", 0, view_wait_s=0.05, unknown_job_wait_s=0) is None


async def test_settle_looks_again_when_something_arrives_for_an_unknown_job() -> None:
    gw = FakeGateway(snap(True, None), snap(True, ALICE))
    sub = Subscriber("job1", 8)
    sub.mark_resync()  # the job's first event arrived live meanwhile
    got = await settle(gw, sub, "job1", 0, view_wait_s=1, unknown_job_wait_s=5)
    assert got is not None and got.owner == ALICE and gw.reads == 2 and not sub.resync


async def test_settle_answers_unknown_after_the_wait() -> None:
    gw = FakeGateway(snap(True, None))
    got = await settle(gw, Subscriber("job1", 8), "job1", 0, view_wait_s=1, unknown_job_wait_s=0.05)
    assert got is not None and got.owner is None
