"""Issue 19: the scan POST caches its job's queued state while the Kafka transaction commits.

The Redis write runs beside the transaction (one round trip less on the POST's path). An accepted
POST's state is there when its 202 is; a failed transaction leaves nothing in Redis for its job.
The app runs in-process against the stack's Redis and Kafka; a failing transaction is a stand-in
writer whose submit raises (Kafka down), after the cache write has landed or before.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from contract import keys
from contract.events import QUEUED_SEQ, ScanEvent, ScanJob
from contract.settings import Settings
from producers.api import create_app

pytestmark = pytest.mark.integration

SCAN = "/api/v1/scan"


async def _no_stored_result(job_id: str) -> dict[str, Any] | None:
    return None


class FailingWriter:
    """A transaction that fails, once the job's cache write is in Redis (`after_cache`) or at once."""

    def __init__(self, app: Any, after_cache: bool) -> None:
        self.app = app
        self.after_cache = after_cache
        self.jobs: list[str] = []
        self.saw_cache = False

    async def submit(self, job: ScanJob, event: ScanEvent, traceparent: str) -> None:
        self.jobs.append(job.job_id)
        if self.after_cache:  # the cache write runs beside the transaction: it lands meanwhile
            deadline = time.monotonic() + 5
            while not await self.app.state.redis.exists(keys.state(job.job_id)):
                assert time.monotonic() < deadline, "the queued state was not written during the transaction"
                await asyncio.sleep(0.005)
            self.saw_cache = True
        raise ConnectionError("Kafka is down")

    async def stop(self) -> None:
        pass


def _settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scan_burst": 0, "inflight_max": 0})


@pytest.mark.parametrize("after_cache", [True, False], ids=["cache-landed-first", "failed-at-once"])
def test_a_failed_transaction_leaves_no_queued_state(
    settings: Settings, stack_status: object, uid: str, after_cache: bool
) -> None:
    s = _settings(settings)
    r = redis.Redis.from_url(s.redis_url)
    app = create_app(s, result_fallback=_no_stored_result)
    with TestClient(app) as client:
        real = app.state.writer
        fake = FailingWriter(app, after_cache)
        app.state.writer = fake
        try:
            resp = client.post(
                SCAN,
                json={"image_url": f"https://images.example.com/cache/{uid}.jpg"},
                headers={"X-User-ID": f"cache-{uid}"},
            )
        finally:
            app.state.writer = real
    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"] and resp.json()["error"] == "unavailable"
    assert fake.saw_cache is after_cache
    [job_id] = fake.jobs
    assert not r.exists(keys.state(job_id), keys.history(job_id))
    r.close()


def test_an_accepted_post_finds_its_queued_state_at_the_202(
    settings: Settings, stack_status: object, uid: str
) -> None:
    s = _settings(settings)
    r = redis.Redis.from_url(s.redis_url)
    user = f"cache-{uid}"
    with TestClient(create_app(s, result_fallback=_no_stored_result)) as client:
        body = {"image_url": f"https://images.example.com/cache/{uid}.jpg"}
        resp = client.post(SCAN, json=body, headers={"X-User-ID": user})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]
        state: dict[bytes, bytes] = r.hgetall(keys.state(job_id))  # type: ignore[assignment]
        assert state[b"user_id"] == user.encode() and int(state[b"seq"]) >= QUEUED_SEQ
        assert r.zcount(keys.history(job_id), QUEUED_SEQ, QUEUED_SEQ) == 1
        result = client.get(f"/api/v1/scan/{job_id}/result", headers={"X-User-ID": user})
        assert result.status_code in (200, 202), result.text
    r.close()
