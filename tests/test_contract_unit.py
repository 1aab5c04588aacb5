"""Unit tests of the published-contract pieces: stream tokens, idempotency keys, SSE event names,
the image_url pattern and the client's token handling (no stack)."""

from __future__ import annotations

import re
import stat
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from contract import keys, stream_token
from contract.events import FAILED_EVENT, SSE_EVENTS, sse_event_name
from contract.settings import Settings
from gateway.client import follow, token_of
from producers.validation import InvalidInput, check_image_url, request_schema

from .gateway_support import full_events, job

S = Settings.model_construct(stream_token_secret=SecretStr("k" * 48))


def test_idempotency_keys_cannot_collide_across_users() -> None:
    assert keys.idempotency("a:b", "c") != keys.idempotency("a", "b:c")
    pairs = [(u, k) for u in ("a", "a:b", "a:b:c", "", "1:a") for k in ("c", "b:c", ":", "")]
    assert len({keys.idempotency(u, k) for u, k in pairs}) == len(pairs)


def test_stream_token_binds_job_user_and_time() -> None:
    token = stream_token.issue(S, "job-1", "alice")
    assert stream_token.verify(S, token, "job-1") == stream_token.StreamGrant("job-1", "alice")
    with pytest.raises(stream_token.InvalidToken, match="another job"):
        stream_token.verify(S, token, "job-2")
    expired = stream_token.issue(S, "job-1", "alice", now=time.time() - S.stream_token_ttl_s - 5)
    with pytest.raises(stream_token.InvalidToken, match="expired"):
        stream_token.verify(S, expired, "job-1")
    other_key = Settings.model_construct(stream_token_secret=SecretStr("x" * 48))
    with pytest.raises(stream_token.InvalidToken):
        stream_token.verify(other_key, token, "job-1")
    head, payload, sig = token.split(".")
    with pytest.raises(stream_token.InvalidToken):
        stream_token.verify(S, f"{head}.{payload}x.{sig}", "job-1")


def test_stream_token_secret_is_generated_once_per_checkout(tmp_path: Path) -> None:
    s = Settings.model_construct(local_dir=tmp_path)
    first = stream_token.secret(s)
    assert first == stream_token.secret(s) and len(first) >= 32
    key = tmp_path / "stream-token.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [key]  # no temporary file left behind


def test_sse_event_names() -> None:
    assert sse_event_name("rule", "failed") == FAILED_EVENT == "failed"
    assert sse_event_name("rule", "started") == "rule"
    assert "error" not in SSE_EVENTS and FAILED_EVENT in SSE_EVENTS


@pytest.mark.parametrize(
    "url,ok",
    [
        ("https://images.example.com/a.jpg", True),
        ("HTTP://Images.Example.COM:8443/a%20b.jpg?x=1#y", True),
        ("https://cdn.example.co.kr/사진.jpg", True),
        ("https://93.184.216.34/a.jpg", False),
        ("https://images/a.jpg", False),
        ("https://a.example.com/a\u00a0b.jpg", False),
        ("https://a.example.com/a\u0085b.jpg", False),
        ("https://a.example.com/\n", False),
        ("https://user@a.example.com/x.jpg", False),
    ],
)
def test_image_url_pattern_is_what_the_check_enforces(url: str, ok: bool) -> None:
    s = Settings.model_construct()
    pattern = request_schema(s)["properties"]["image_url"]["pattern"]
    assert bool(re.fullmatch(pattern, url)) is ok
    if ok:
        assert check_image_url(url, s) == url
    else:
        with pytest.raises(InvalidInput):
            check_image_url(url, s)


def test_request_schema_follows_settings() -> None:
    s = Settings.model_construct(
        max_image_url_len=99, supported_models=["m1"], image_host_allowlist=["cdn.x.io"]
    )
    props = request_schema(s)["properties"]
    assert props["image_url"]["maxLength"] == 99
    assert props["model"]["anyOf"][0]["enum"] == ["m1"]
    assert re.fullmatch(props["image_url"]["pattern"], "https://img.CDN.x.io/a.jpg")
    assert not re.fullmatch(props["image_url"]["pattern"], "https://cdn.x.io.evil.com/a.jpg")


async def test_client_follows_with_the_token_alone() -> None:
    events = full_events(job("alice", "job-1"))
    url = "/api/v1/scan/job-1/events?token=TOKEN"
    assert token_of(url) == "TOKEN" and token_of("/api/v1/scan/job-1/events") is None

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["token"] == "TOKEN" and "X-User-ID" not in request.headers
        body = "".join(
            f"event: {e.sse_event}\r\nid: {e.seq}\r\ndata: {e.model_dump_json()}\r\n\r\n" for e in events
        )
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        got = await follow("http://gw", "job-1", None, token=token_of(url), client=client)
    assert [e.seq for e in got] == [e.seq for e in events]


def test_every_400_code_the_api_can_answer_is_documented() -> None:
    """Each InvalidInput code in validation.py and each 400 code in api.py has an example."""
    from producers import api, openapi, validation

    source = Path(validation.__file__).read_text() + Path(api.__file__).read_text()
    codes = set(re.findall(r'InvalidInput\(\s*"([a-z_]+)"', source))
    codes |= set(re.findall(r'error\(\s*400,\s*"([a-z_]+)"', source))
    examples = openapi.submit_responses(Settings.model_construct())[400]["content"]["application/json"]
    documented = {e["value"]["error"] for e in examples["examples"].values()}
    assert len(codes) >= 10 and codes <= documented, codes - documented
