"""The two model calls of a scan, through the `openai` package (hosted model or the simulator)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
from openai import AsyncOpenAI, DefaultAioHttpClient
from openai._constants import DEFAULT_CONNECTION_LIMITS

from catalog import rules
from contract import trace
from contract.events import ScanJob
from contract.settings import Settings

VISION_PROMPT = (
    "You classify a photographed piece of waste for Korean separate collection. "
    "Use only the category names of the schema. Situation tags describe the item's state."
)
ANSWER_PROMPT = (
    "You write disposal instructions for one item from its classification and the official rules "
    "given as JSON. Keep to the rules; list in `gaps` anything the rules do not cover."
)


class TransientModelError(Exception):
    """Worth retrying: overload, timeout, connection trouble."""


class PermanentModelError(Exception):
    """Retrying cannot help: the request or its answer is unusable."""


def client(s: Settings, max_connections: int | None = None) -> AsyncOpenAI:
    """One reused client on the SDK's aiohttp transport (`DefaultAioHttpClient`, the SDK's
    documented option; aiohttp is already installed for Faust). The SDK's default transport
    (httpx2 -> httpcore2 -> h11 on anyio) parsed and wrote each request in pure Python: ~10% of a
    stage worker's CPU at 300 VUs; aiohttp's C parser and plain asyncio streams do it for a
    fraction (issue 19). Its pool keeps every connection alive (the SDK's default limits keep 100
    of 1,000, so at a few hundred calls in flight it would reconnect for most calls)."""
    n = max_connections or s.model_max_connections
    return AsyncOpenAI(
        base_url=s.model_base_url,
        api_key=s.model_api_key,
        max_retries=0,  # retries are ours (per stage, with backoff and metrics), not the library's
        timeout=s.stage_timeout_s,
        http_client=DefaultAioHttpClient(
            # the Limits class of whichever httpx the SDK is built on
            limits=type(DEFAULT_CONNECTION_LIMITS)(
                max_connections=n,
                max_keepalive_connections=n,
                keepalive_expiry=DEFAULT_CONNECTION_LIMITS.keepalive_expiry,
            ),
            timeout=s.stage_timeout_s,
        ),
    )


class Clients:
    """A few clients taken in turn, each with its share of the connections.

    With the SDK's default (httpcore) transport, the pool walked all of its connections whenever
    a request started or ended, so several smaller pools cost hundreds of calls in flight less;
    aiohttp's pool does not walk, and `model_client_pools` is kept only to spread the sockets."""

    def __init__(self, s: Settings) -> None:
        pools = max(1, s.model_client_pools)
        per_pool = max(1, -(-s.model_max_connections // pools))
        self.clients = [client(s, per_pool) for _ in range(pools)]
        self._next: Iterator[AsyncOpenAI] = itertools.cycle(self.clients)

    def take(self) -> AsyncOpenAI:
        return next(self._next)


async def _structured(
    api: AsyncOpenAI,
    model: str,
    messages: list[dict[str, Any]],
    name: str,
    schema: dict[str, Any],
    job_id: str,
) -> dict[str, Any]:
    try:
        # The SDK's own client and transport (auth, timeouts, error mapping), but the body we
        # build and the raw response: its typed-parameter transform and ChatCompletion model cost
        # ~8% of a stage worker's CPU for fields we never read (docs/benchmarks.md, issue 13).
        raw = await api.post(
            "/chat/completions",
            cast_to=httpx2.Response,
            body={
                "model": model,
                "messages": messages,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": True},
                },
                "temperature": 0,
            },
            options={"headers": {trace.JOB_HEADER: job_id}},
        )
    except (
        openai.APITimeoutError,
        openai.APIConnectionError,
        openai.RateLimitError,
        openai.InternalServerError,
    ) as exc:
        raise TransientModelError(f"{type(exc).__name__}: {exc}") from exc
    except openai.APIStatusError as exc:
        if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
            raise TransientModelError(f"HTTP {exc.status_code}: {exc.message}") from exc
        raise PermanentModelError(f"HTTP {exc.status_code}: {exc.message}") from exc
    try:
        choices = json.loads(raw.content).get("choices") or []
        content = choices[0]["message"]["content"] if choices else None
    except (ValueError, AttributeError, LookupError, TypeError) as exc:
        raise TransientModelError(f"model returned an unreadable response: {raw.content!r:.200}") from exc
    try:
        doc = json.loads(content or "")
    except ValueError as exc:
        raise TransientModelError(f"model returned non-JSON content: {content!r:.200}") from exc
    if not isinstance(doc, dict):
        raise PermanentModelError(f"model returned {type(doc).__name__}, not an object")
    return doc


def model_for(job: ScanJob, configured: str) -> str:
    """The model one call of `job` uses: the client's choice for the whole job, else the calling
    stage's own setting (so ECO2_ANSWER_MODEL reaches the answer call)."""
    return job.model or configured


async def classify(api: AsyncOpenAI, s: Settings, job: ScanJob) -> dict[str, Any]:
    text = "Classify this item." + (f" The user says: {job.user_input}" if job.user_input else "")
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": VISION_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": job.image_url}},
            ],
        },
    ]
    doc = await _structured(
        api,
        model_for(job, s.vision_model),
        messages,
        "classification",
        rules.classification_schema(),
        job.job_id,
    )
    if doc.get("major_category") not in rules.MAJOR_CATEGORIES:
        raise PermanentModelError(f"unknown major category {doc.get('major_category')!r}")
    return doc


async def write_answer(api: AsyncOpenAI, s: Settings, job: ScanJob, advice: list[str]) -> dict[str, Any]:
    context = {
        "image_url": job.image_url,
        "user_input": job.user_input,
        "classification": job.classification,
        "rules_key": job.rules_key,
        "rule": job.rules,
        "situation_advice": advice,
    }
    messages = [
        {"role": "system", "content": ANSWER_PROMPT},
        {"role": "user", "content": json.dumps(context, ensure_ascii=False)},
    ]
    doc = await _structured(
        api, model_for(job, s.answer_model), messages, "answer", rules.answer_schema(), job.job_id
    )
    if not isinstance(doc.get("disposal_steps"), list) or not isinstance(doc.get("gaps", []), list):
        raise PermanentModelError("answer does not follow the schema")
    return doc
