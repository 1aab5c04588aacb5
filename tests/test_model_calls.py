"""The model call of a stage (`streams/model.py`) as the hosted model sees it, and how its failures
map to the stage's retries.

The workers' own client (`model.client`) is driven over a mock transport (`with_options`, the SDK's
public copy, keeps its headers, auth and base URL), so what is checked is what the SDK would put
on the wire: the body our bytes replace (issue 19), no telemetry headers, the job header, and each
failure as `TransientModelError` (retried by `Pipeline._with_retries`) or `PermanentModelError`
(the job fails at once)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from openai import AsyncOpenAI

from catalog import rules
from contract import trace
from contract.events import ScanJob, now
from contract.settings import Settings
from streams import model

CLASSIFICATION = {
    "major_category": "recyclable",
    "middle_category": "pet",
    "minor_category": "bottle",
    "situation_tags": [],
    "confidence": 0.9,
}
S = Settings(vision_model="vision-m", answer_model="answer-m")


def _reply(doc: Any) -> httpx2.Response:
    message = {"role": "assistant", "content": json.dumps(doc)}
    return httpx2.Response(200, json={"choices": [{"message": message}]})


def _api(handler: Callable[[httpx2.Request], httpx2.Response]) -> AsyncOpenAI:
    """The workers' client, its transport swapped for `handler` (nothing else changed)."""
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    return model.client(S).with_options(http_client=http)


def _job(**extra: Any) -> ScanJob:
    return ScanJob(
        job_id="job-1", user_id="u", image_url="https://img.example/a.jpg", created_at=now(), **extra
    )


async def test_the_request_is_the_chat_completion_the_sdk_would_have_encoded() -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return _reply(CLASSIFICATION)

    api = _api(handler)
    assert await model.classify(api, S, _job(user_input="a bottle é")) == CLASSIFICATION
    (request,) = seen
    assert str(request.url) == f"{S.model_base_url.rstrip('/')}/chat/completions"
    assert request.method == "POST"
    body = json.loads(request.content)
    assert body == {
        "model": "vision-m",
        "messages": [
            {"role": "system", "content": model.VISION_PROMPT},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Classify this item. The user says: a bottle é"},
                    {"type": "image_url", "image_url": {"url": "https://img.example/a.jpg"}},
                ],
            },
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "classification",
                "schema": rules.classification_schema(),
                "strict": True,
            },
        },
        "temperature": 0,
    }
    # byte for byte what the SDK's own encoder makes of that body (compact, UTF-8, not escaped)
    from openai._utils._json import openapi_dumps

    assert request.content == openapi_dumps(body)
    headers = request.headers
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == f"Bearer {S.model_api_key}"
    assert headers[trace.JOB_HEADER] == "job-1"
    assert not [h for h in headers if h.lower().startswith("x-stainless")], headers


async def test_the_answer_call_sends_its_own_schema_and_context() -> None:
    seen: list[dict[str, Any]] = []
    answer = {"disposal_steps": ["rinse"], "gaps": [], "user_answer": "ok", "warnings": []}

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        return _reply(answer)

    job = _job(classification=CLASSIFICATION, rules_key="pet", rules={"steps": ["비우기"]})
    assert await model.write_answer(_api(handler), S, job, ["rinse it"]) == answer
    (body,) = seen
    assert body["model"] == "answer-m"
    assert body["response_format"]["json_schema"] == {
        "name": "answer",
        "schema": rules.answer_schema(),
        "strict": True,
    }
    context = json.loads(body["messages"][1]["content"])
    assert context["rule"] == {"steps": ["비우기"]} and context["situation_advice"] == ["rinse it"]


def _status(code: int) -> Callable[[httpx2.Request], httpx2.Response]:
    return lambda request: httpx2.Response(code, json={"error": {"message": f"status {code}"}})


def _raise(exc: Exception) -> Callable[[httpx2.Request], httpx2.Response]:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (_status(500), model.TransientModelError),
        (_status(503), model.TransientModelError),
        (_status(429), model.TransientModelError),
        (_status(408), model.TransientModelError),
        (_status(409), model.TransientModelError),
        (_status(400), model.PermanentModelError),
        (_status(404), model.PermanentModelError),
        (_raise(httpx2.ConnectError("refused")), model.TransientModelError),
        (_raise(httpx2.ReadTimeout("slow")), model.TransientModelError),
        (lambda r: httpx2.Response(200, content=b"<html>"), model.TransientModelError),
        (
            lambda r: httpx2.Response(200, json={"choices": [{"message": {"content": "not json"}}]}),
            model.TransientModelError,
        ),
        (lambda r: _reply(["a list"]), model.PermanentModelError),
        (lambda r: _reply({**CLASSIFICATION, "major_category": "moon rock"}), model.PermanentModelError),
    ],
    ids=[
        "500", "503", "429", "408", "409", "400", "404", "connect", "timeout",
        "unreadable", "non-json-content", "not-an-object", "unknown-category",
    ],
)
async def test_each_failure_is_transient_or_permanent(
    handler: Callable[[httpx2.Request], httpx2.Response], expected: type[Exception]
) -> None:
    calls: list[int] = []

    def counted(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return handler(request)

    with pytest.raises(expected):
        await model.classify(_api(counted), S, _job())
    assert calls == [1]  # the SDK retries nothing: retries are the stage's, with its backoff
