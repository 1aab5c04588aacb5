"""The published HTTP contracts against the running stack: schemathesis over both services'
OpenAPI (all checks, stateful phase included, bounded by a fixed example count and seed), strict
idempotency, and the POST's Location and signed stream URL."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from contract import stream_token
from contract.settings import Settings
from gateway.client import follow, token_of
from producers.client import submit, wait_result

pytestmark = pytest.mark.integration

ST = str(Path(sys.executable).parent / "st")
# A body over ECO2_MAX_BODY_BYTES is refused with 413 before it is parsed, whatever its content:
# JSON Schema cannot bound a body's encoded size (unknown fields, \uXXXX escapes), so 413 counts as
# a documented answer next to schemathesis' default expected statuses.
BODY_LIMIT = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "429", "5xx"]

[checks.negative_data_rejection]
expected-statuses = [
  "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]
"""
# Bounded and reproducible: a fixed number of examples per operation and phase, a fixed seed.
FUZZ = ["--checks", "all", "--phases", "examples,coverage,fuzzing,stateful", "-n", "25", "--seed", "1414"]
IMAGE = "https://images.example.com/scans/glass_bottle.jpg"


@pytest.fixture
async def api(settings: Settings, zero_latency_model: str):  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=30) as http:
        yield http


def schemathesis(url: str, tmp_path: Path, *args: str, config: str = "") -> str:
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text(config)
    proc = subprocess.run(
        [ST, "--config-file", str(cfg), "run", url, *FUZZ, "--no-color", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"schemathesis found problems:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert "No issues found" in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


async def test_schemathesis_finds_nothing_in_the_scan_api(
    settings: Settings, zero_latency_model: str, tmp_path: Path, uid: str
) -> None:
    """The stateful phase follows the POST's links to the result operation."""
    out = await asyncio.to_thread(
        schemathesis,
        f"{settings.api_url}/openapi.json",
        tmp_path,
        *("-H", f"X-User-ID: st-{uid}"),
        config=BODY_LIMIT,
    )
    links = re.search(r"API Links:\s+(\d+) covered", out)
    assert links and int(links.group(1)) >= 1, out[-3000:]


async def test_schemathesis_finds_nothing_in_the_gateway(
    settings: Settings, api: httpx.AsyncClient, tmp_path: Path, uid: str
) -> None:
    """Fuzzed on a real finished job with its real stream token, so the 200 event streams are
    checked against the per-event schema too (event names, ids, ScanEvent data)."""
    accepted = await submit(api, IMAGE, f"st-{uid}")
    await wait_result(api, accepted["job_id"], f"st-{uid}", interval_s=0.2, timeout_s=60)
    config = (
        f'[auth.openapi.StreamToken]\napi_key = "{token_of(accepted["stream_url"])}"\n\n'
        f'[[operations]]\ninclude-operation-id = "streamScanEvents"\n'
        f'parameters = {{ "path.job_id" = "{accepted["job_id"]}" }}\n'
    )
    har = tmp_path / "gateway.har"
    await asyncio.to_thread(
        schemathesis,
        f"{settings.gateway_url}/openapi.json",
        tmp_path,
        *("--report", "har", "--report-har-path", str(har)),
        config=config,
    )
    streamed = [
        e
        for e in json.loads(har.read_text())["log"]["entries"]
        if e["response"]["status"] == 200 and "/events" in e["request"]["url"]
    ]
    assert streamed and all("event: done" in e["response"]["content"]["text"] for e in streamed)


async def test_same_idempotency_key_same_body_same_job_other_body_409(api: httpx.AsyncClient, uid: str):
    user, key = f"user-{uid}", f"k-{uid}"
    first = await submit(api, IMAGE, user, idempotency_key=key)
    again = await submit(api, IMAGE, user, idempotency_key=key)
    assert again["job_id"] == first["job_id"]
    other = await api.post(
        "/api/v1/scan",
        json={"image_url": IMAGE, "user_input": "a different scan"},
        headers={"X-User-ID": user, "X-Idempotency-Key": key},
    )
    assert other.status_code == 409, other.text
    assert other.json()["error"] == "idempotency_key_reused" and other.json()["job_id"] == first["job_id"]


async def test_idempotency_keys_do_not_collide_across_users(api: httpx.AsyncClient, uid: str):
    """User `a:b` with key `c` and user `a` with key `b:c` once shared one Redis entry."""
    one = await submit(api, IMAGE, f"{uid}:b", idempotency_key="c")
    two = await submit(api, IMAGE, uid, idempotency_key="b:c")
    assert one["job_id"] != two["job_id"]


async def test_idempotency_key_length_is_checked(api: httpx.AsyncClient, settings: Settings):
    long_key = "k" * (settings.max_idempotency_key_len + 1)
    resp = await api.post(
        "/api/v1/scan", json={"image_url": IMAGE}, headers={"X-User-ID": "u", "X-Idempotency-Key": long_key}
    )
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_idempotency_key"


async def test_accepted_scan_has_location_and_a_stream_token_for_job_and_user(
    api: httpx.AsyncClient, settings: Settings, uid: str
) -> None:
    resp = await api.post("/api/v1/scan", json={"image_url": IMAGE}, headers={"X-User-ID": uid})
    assert resp.status_code == 202
    body: dict[str, Any] = resp.json()
    assert resp.headers["Location"] == body["result_url"] == f"/api/v1/scan/{body['job_id']}/result"
    token = token_of(body["stream_url"])
    assert token and stream_token.verify(settings, token, body["job_id"]).user_id == uid
    poll = await api.get(body["result_url"], headers={"X-User-ID": uid})
    if poll.status_code == 202:
        assert poll.headers["Location"] == body["result_url"]
    # The stack's gateway streams the job on the token alone, as a browser's EventSource would.
    events = await follow(settings.gateway_url, body["job_id"], None, token=token)
    assert events[-1].stage == "done" and events[0].seq == 1


@pytest.mark.parametrize(
    "image_url",
    [
        "https://93.184.216.34/a.jpg",  # a public IP literal: the schema asks for a DNS name
        " https://images.example.com/a.jpg",  # surrounding whitespace
        "https://images.example.com/a b.jpg",
        "https://images.example.com:99999999/a.jpg",
    ],
)
async def test_urls_outside_the_published_pattern_are_400(api: httpx.AsyncClient, image_url: str):
    resp = await api.post("/api/v1/scan", json={"image_url": image_url}, headers={"X-User-ID": "u"})
    assert resp.status_code == 400 and resp.json()["error"] == "image_url_format", resp.text


async def test_lone_surrogates_are_a_400_not_a_503(api: httpx.AsyncClient):
    """JSON can escape a lone surrogate; it is no text (Kafka could not take it)."""
    body = '{"image_url": "https://images.example.com/a.jpg", "user_input": "\\udc00"}'
    headers = {"X-User-ID": "u", "Content-Type": "application/json"}
    resp = await api.post("/api/v1/scan", content=body, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_text", resp.text
