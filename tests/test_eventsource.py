"""The gateway's stream through a third-party, standards-following EventSource (npm `eventsource`,
run by node): a failed job and a dropped connection are told apart, and reconnecting with
Last-Event-ID delivers every seq once."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest

from contract import stream_token
from contract.events import SSE_EVENTS
from contract.settings import Settings

from .gateway_support import EventProducer, Proc, delete_jobs, full_events, gateway_proc, job, wait_ready
from .node_tools import SCRIPTS, node_dir

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.gateway_fixtures"]

FULL = [1, 10, 11, 20, 21, 30, 31, 40, 41, 51]


async def event_source(settings: Settings, url: str, timeout_s: float = 30) -> dict[str, Any]:
    """What the EventSource saw following `url` until a terminal event, a refusal or the timeout."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(SCRIPTS / "follow_eventsource.mjs"),
        url,
        str(int(timeout_s * 1000)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"ECO2_NODE_DIR": str(node_dir(settings)), "SSE_EVENTS": json.dumps(list(SSE_EVENTS))},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s + 30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)  # type: ignore[no-any-return]


def url_for(gateway: str, settings: Settings, job_id: str, user: str) -> str:
    return f"{gateway}/api/v1/scan/{job_id}/events?token={stream_token.issue(settings, job_id, user)}"


async def test_a_failed_job_is_not_a_connection_error(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, gw_gateway: str, uid: str
) -> None:
    j = job(uid)
    await gw_producer.send_all(full_events(j, fail_at="rule"))
    seen = await event_source(settings, url_for(gw_gateway, settings, j.job_id, uid))
    assert seen["terminal"] == "failed" and seen["errors"] == [], seen
    assert [e["seq"] for e in seen["events"]] == [1, 10, 11, 20, 99]
    assert seen["events"][-1] == {"name": "failed", "id": "99", "seq": 99, "status": "failed"}
    # A refused stream is the connection's error: no data, the EventSource gives up (CLOSED = 2).
    refused = await event_source(settings, url_for(gw_gateway, settings, j.job_id, f"mallory-{uid}"))
    assert refused["events"] == [] and refused["terminal"] is None
    assert refused["errors"] == [{"data": None, "code": 404, "readyState": 2}], refused
    await delete_jobs(settings, [j.job_id])


async def test_dropped_connections_resume_with_last_event_id_once_each(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, uid: str
) -> None:
    """The gateway ends every stream after 1.5 s (ECO2_MAX_STREAM_S) while the job is running:
    to the client that is a dropped connection, and the EventSource reconnects by itself."""
    gw = gateway_proc(settings, ECO2_MAX_STREAM_S="1.5")
    gw.start()
    try:
        gateway = await wait_ready(gw)
        j = job(uid)
        events = full_events(j)
        await gw_producer.send(events[0])
        following = asyncio.create_task(event_source(settings, url_for(gateway, settings, j.job_id, uid), 60))
        await gw_producer.send_all(events[1:], gap_s=0.5)
        seen = await following
    finally:
        gw.kill(signal.SIGTERM)
    assert seen["terminal"] == "done", seen
    assert [e["seq"] for e in seen["events"]] == FULL  # every seq once, in order, across reconnects
    assert [e["id"] for e in seen["events"]] == [str(s) for s in FULL]
    drops = seen["errors"]
    assert drops and all(d["data"] is None and d["readyState"] == 0 for d in drops), drops  # 0 = CONNECTING
    await delete_jobs(settings, [j.job_id])
