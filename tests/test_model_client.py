"""The stage workers' model call (streams/model.py, issue 19): the request built once per SDK client
must still carry what `AsyncOpenAI.post` sent (URL, auth, the SDK's headers, the job header, the
body), and errors must map as the SDK's did (transient: retried by the stage; permanent: fails)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from openai import AsyncOpenAI

from contract import trace
from streams import model

DOC = {"disposal_steps": ["rinse"], "gaps": []}


def _api(handler: Callable[[httpx2.Request], httpx2.Response]) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url="http://model.test/v1",
        api_key="sk-test",
        organization="org-1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )


def _ok(seen: list[httpx2.Request]) -> Callable[[httpx2.Request], httpx2.Response]:
    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json={"choices": [{"message": {"content": json.dumps(DOC)}}]})

    return handler


async def test_the_request_carries_the_sdks_url_auth_headers_and_the_job() -> None:
    seen: list[httpx2.Request] = []
    api = _api(_ok(seen))
    for job in ("job-1", "job-2"):  # the second call reuses what the first worked out
        doc = await model._structured(api, "m", [{"role": "user", "content": "hi"}], "answer", {}, job)
        assert doc == DOC
    first, second = seen
    assert str(first.url) == "http://model.test/v1/chat/completions" and first.method == "POST"
    assert first.headers["authorization"] == "Bearer sk-test"
    assert first.headers["openai-organization"] == "org-1"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"].startswith("AsyncOpenAI/Python")
    assert (first.headers[trace.JOB_HEADER], second.headers[trace.JOB_HEADER]) == ("job-1", "job-2")
    assert "openai-project" not in first.headers  # the SDK's `Omit`: not sent
    body = json.loads(first.content)
    assert body["model"] == "m" and body["temperature"] == 0
    assert body["response_format"]["json_schema"] == {"name": "answer", "schema": {}, "strict": True}
    assert first.extensions["timeout"] == api.timeout.as_dict()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, model.TransientModelError),
        (503, model.TransientModelError),
        (408, model.TransientModelError),
        (400, model.PermanentModelError),
        (401, model.PermanentModelError),
    ],
)
async def test_http_errors_map_as_the_sdks_did(status: int, error: type[Exception]) -> None:
    api = _api(lambda request: httpx2.Response(status, json={"error": {"message": "nope"}}))
    with pytest.raises(error, match=f"HTTP {status}"):
        await model._structured(api, "m", [], "answer", {}, "j")


@pytest.mark.parametrize(
    "exc", [httpx2.ConnectError("refused"), httpx2.ReadTimeout("slow"), RuntimeError("odd transport")]
)
async def test_connection_trouble_and_timeouts_are_transient(exc: Exception) -> None:
    def handler(request: httpx2.Request) -> Any:
        raise exc

    with pytest.raises(model.TransientModelError):
        await model._structured(_api(handler), "m", [], "answer", {}, "j")


async def test_an_unreadable_answer_is_transient_and_a_non_object_permanent() -> None:
    api = _api(lambda request: httpx2.Response(200, content=b"<html>"))
    with pytest.raises(model.TransientModelError, match="unreadable"):
        await model._structured(api, "m", [], "answer", {}, "j")
    api = _api(lambda r: httpx2.Response(200, json={"choices": [{"message": {"content": "[1]"}}]}))
    with pytest.raises(model.PermanentModelError, match="not an object"):
        await model._structured(api, "m", [], "answer", {}, "j")
