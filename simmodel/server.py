"""An OpenAI-compatible chat-completions server that answers the pipeline's two calls.

Deterministic: the classification is derived from the image URL's file name (tokens such as
`clear_pet`, `glass_bottle`, `label_attached`), the answer from the rules sent in the prompt.
Latency is configurable (the hosted model took 5-10 s a call) and can be changed at run time
through `PUT /admin/latency`, so tests run at 0 s and load tests at the hosted model's pace.

`GET /admin/stats` counts calls per schema and image URL; `?by=job` per job (the stage workers send
the job id in the `X-Eco2-Job-Id` header), which is how a test proves no model call was repeated.

Fault injection, also from the file name, for tests of the pipeline's error handling:
- `transientN` (e.g. `transient2-paper.jpg`): the first N calls for that URL and schema get a 503,
- `permanent`: every call gets a 400 (a request the model will never accept),
- `gaps`: the answer reports a gap (so no reward is granted),
- `slowN`: the answer call takes N seconds more (one job held in the answer stage among others).

And an outage, whatever the file name: `PUT /admin/outage {"schemas": ["answer"]}` makes every
call of those response schemas a 400 (a model deployment that rejects every request, as in an
incident) until `{"schemas": []}`; the test of dead-letter re-drives fails jobs with it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from catalog import rules
from contract import trace
from contract.settings import Settings, get_settings
from runtime.metrics import add_metrics_route, track_event_loop

_TOKEN_SPLIT = re.compile(r"[^a-z0-9_]+")


class Latency(BaseModel):
    min_s: float
    max_s: float


class CallCounts:
    """Calls per (schema, image URL), as `transientN` needs them, plus the total.

    Bounded: every scan has its own URL, so an unbounded counter grew by two entries per scan for
    as long as the server ran (~140,000 entries in an hour at 300 VUs). The least recently called URLs
    are forgotten first; a transient fault needs its count only for the seconds of its retries."""

    def __init__(self, max_urls: int = 20_000) -> None:
        self.max_urls = max_urls
        self.total = 0
        self._per_url: OrderedDict[str, int] = OrderedDict()
        self._per_job: OrderedDict[str, dict[str, int]] = OrderedDict()  # same bound as per URL

    def add_job(self, job_id: str, schema: str) -> None:
        """Count one call of `schema` for the job named by the request's job header."""
        counts = self._per_job.pop(job_id, {})
        counts[schema] = counts.get(schema, 0) + 1
        self._per_job[job_id] = counts
        while len(self._per_job) > self.max_urls:
            self._per_job.popitem(last=False)

    def by_job(self) -> dict[str, Any]:
        """Calls per job and schema, as `eco2 chaos --rollout` checks them (one each, never two)."""
        return {"total": self.total, "jobs": {j: dict(c) for j, c in self._per_job.items()}}

    def add(self, key: str) -> int:
        """Count one call of `key`; returns its count so far."""
        self.total += 1
        n = self._per_url.pop(key, 0) + 1
        self._per_url[key] = n
        while len(self._per_url) > self.max_urls:
            self._per_url.popitem(last=False)
        return n

    def __len__(self) -> int:
        return len(self._per_url)

    def as_dict(self) -> dict[str, int]:
        return {**self._per_url, "total": self.total}


def _tokens(image_url: str) -> list[str]:
    name = urlparse(image_url).path.rsplit("/", 1)[-1].lower()
    name = name.rsplit(".", 1)[0]
    parts = [p for p in _TOKEN_SPLIT.split(name.replace("-", " ")) if p]
    return parts


def _counted(words: list[str], token: str) -> int | None:
    """N of the first `{token}N` word of the file name (`transient2` -> 2), if any."""
    for w in words:
        m = re.fullmatch(rf"{token}(\d+)", w)
        if m:
            return int(m.group(1))
    return None


def _find(words: list[str], names: tuple[str, ...] | list[str]) -> str | None:
    """The first category name that appears in the file name (longest names first)."""
    joined = "_".join(words)
    for n in sorted(names, key=len, reverse=True):
        if re.search(rf"(^|_){re.escape(n)}($|_)", joined):
            return n
    return None


def classify(image_url: str) -> dict[str, Any]:
    words = _tokens(image_url)
    all_middles = [m for ms in rules.MIDDLE_CATEGORIES.values() for m in ms]
    middle = _find(words, all_middles)
    major: str | None = None
    if middle is not None:
        major = next(mj for mj, ms in rules.MIDDLE_CATEGORIES.items() if middle in ms)
    else:
        major = _find(words, list(rules.MAJOR_CATEGORIES))
    tags = [t for t in rules.SITUATION_TAGS if _find(words, [t])]
    noise = ("transient", "permanent", "gaps", "slow", *rules.SITUATION_TAGS)
    minor = " ".join(w.replace("_", " ") for w in words if not w.startswith(noise)) or "item"
    return {
        "major_category": major or "unclassified",
        "middle_category": middle or "unknown",
        "minor_category": minor[:80],
        "situation_tags": tags,
        "confidence": 0.93 if middle else (0.7 if major else 0.2),
    }


def write_answer(context: dict[str, Any]) -> dict[str, Any]:
    rule = context.get("rule") or {}
    steps = list(rule.get("common_steps") or rule.get("disposal_steps") or [])
    steps += list(context.get("situation_advice") or [])
    cls = context.get("classification") or {}
    item = cls.get("minor_category") or "this item"
    gaps = (
        ["the exact material could not be confirmed"]
        if "gaps" in _tokens(context.get("image_url", ""))
        else []
    )
    not_here = rule.get("not_here") or []
    warnings = [
        f"{n.get('item')}: {n.get('goes_to') or n.get('where')}" for n in not_here if isinstance(n, dict)
    ][:3]
    return {
        "disposal_steps": steps or ["Put it in a general waste bag."],
        "user_answer": f"{item.capitalize()}: " + "; ".join(s.rstrip(".") for s in steps[:4]).lower() + ".",
        "warnings": warnings,
        "gaps": gaps,
    }


def _image_url(messages: list[dict[str, Any]]) -> str:
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url":
                    return str(part["image_url"]["url"])
    return ""


def _json_context(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer call sends its context as one JSON document in the user message."""
    for m in reversed(messages):
        content = m.get("content")
        if isinstance(content, str):
            try:
                doc = json.loads(content)
            except ValueError:
                continue
            if isinstance(doc, dict):
                return doc
    return {}


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": None}}, status_code=status)


class Outage(BaseModel):
    """Response schemas whose every call fails with a 400 (`PUT /admin/outage`); none by default."""

    schemas: list[str] = []


def create_app(s: Settings | None = None) -> FastAPI:
    s = s or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        track_event_loop()
        yield

    app = FastAPI(title="eco2 simulated model", version="1", lifespan=lifespan)
    app.state.latency = Latency(min_s=s.sim_latency_min_s, max_s=s.sim_latency_max_s)
    calls = CallCounts()
    app.state.calls = calls
    add_metrics_route(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/admin/latency")
    async def get_latency() -> Latency:
        return app.state.latency  # type: ignore[no-any-return]

    @app.put("/admin/latency")
    async def set_latency(latency: Latency) -> Latency:
        app.state.latency = latency
        return latency

    app.state.outage = Outage()

    @app.get("/admin/outage")
    async def get_outage() -> Outage:
        return app.state.outage  # type: ignore[no-any-return]

    @app.put("/admin/outage")
    async def set_outage(outage: Outage) -> Outage:
        app.state.outage = outage
        return outage

    @app.get("/admin/stats")
    async def stats(by: str = "") -> dict[str, Any]:
        """Calls per schema and image URL (`?by=job`: per job id, from the job header)."""
        return calls.by_job() if by == "job" else calls.as_dict()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in s.supported_models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        messages = body.get("messages") or []
        fmt = (body.get("response_format") or {}).get("json_schema") or {}
        schema_name = fmt.get("name", "")
        image_url = _image_url(messages)
        ctx = _json_context(messages) if schema_name == "answer" else {}
        url = image_url or str(ctx.get("image_url", ""))
        words = _tokens(url)
        n_calls = calls.add(f"{schema_name}:{url}")
        if job_id := request.headers.get(trace.JOB_HEADER):
            calls.add_job(job_id, schema_name)

        lat: Latency = app.state.latency
        if lat.max_s > 0:
            await asyncio.sleep(random.uniform(lat.min_s, max(lat.min_s, lat.max_s)))
        slow_s = _counted(words, "slow")
        if slow_s is not None and schema_name == "answer":
            await asyncio.sleep(slow_s)

        if schema_name in app.state.outage.schemas:
            return _error(400, "simulated outage: the model rejects every request", "invalid_request_error")
        if "permanent" in words:
            return _error(
                400, "simulated permanent error: the image cannot be processed", "invalid_request_error"
            )
        transient = _counted(words, "transient")
        if transient is not None and n_calls <= transient:
            return _error(503, "simulated transient overload", "server_error")

        if schema_name == "classification":
            content = classify(image_url)
        elif schema_name == "answer":
            content = write_answer(ctx)
        else:
            return _error(400, f"unknown response schema {schema_name!r}", "invalid_request_error")
        text = json.dumps(content, ensure_ascii=False)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "simulated"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": 100,
                    "completion_tokens": len(text) // 4,
                    "total_tokens": 100 + len(text) // 4,
                },
            }
        )

    return app
