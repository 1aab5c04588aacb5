"""The two model calls of a scan, through the `openai` package (hosted model or the simulator)."""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any, cast

import httpx2
import openai
from openai import AsyncOpenAI, DefaultAioHttpClient, omit
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


# The SDK's telemetry headers (`X-Stainless-*`), removed with its documented `omit`. httpx keeps
# headers in a list it re-scans on every lookup (each checks the encoding of all of them), and
# building a request looks them up dozens of times: with these 9 of 14 headers gone, the SDK
# builds a request in ~0.4x the CPU (issue 19). The model reads none of them.
TELEMETRY_HEADERS = (
    "X-Stainless-Lang",
    "X-Stainless-Package-Version",
    "X-Stainless-OS",
    "X-Stainless-Arch",
    "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version",
    "X-Stainless-Async",
)
# The two the SDK adds per request unless the request's own headers name them.
PER_REQUEST_TELEMETRY = ("X-Stainless-Retry-Count", "X-Stainless-Read-Timeout")
_NO_REQUEST_TELEMETRY = dict.fromkeys(PER_REQUEST_TELEMETRY, omit)


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
        # `omit` removes a default header (the SDK's documented way; its signature types values str)
        default_headers=dict.fromkeys(TELEMETRY_HEADERS, cast(str, omit)),
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


def _dumps(value: Any) -> bytes:
    """JSON as the SDK encodes a body (`openai._utils._json.openapi_dumps`: compact, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@functools.cache
def _body_tail(name: str, schema: Callable[[], dict[str, Any]]) -> bytes:
    """The end of a request body that is the same for every call of one kind: the strict JSON
    schema of its answer (most of the body) and the temperature, encoded once per process."""
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema(), "strict": True},
    }
    return b',"response_format":' + _dumps(response_format) + b',"temperature":0}'


def request_body(
    model: str, messages: list[dict[str, Any]], name: str, schema: Callable[[], dict[str, Any]]
) -> bytes:
    """The chat completion request as JSON bytes: the model and messages encoded per call, the
    rest once (`_body_tail`)."""
    return b'{"model":' + _dumps(model) + b',"messages":' + _dumps(messages) + _body_tail(name, schema)


async def _structured(
    api: AsyncOpenAI,
    model: str,
    messages: list[dict[str, Any]],
    name: str,
    schema: Callable[[], dict[str, Any]],
    job_id: str,
) -> dict[str, Any]:
    try:
        # The SDK's own client and transport (auth, timeouts, error mapping), but the body we
        # build and the raw response: its typed-parameter transform and ChatCompletion model cost
        # ~8% of a stage worker's CPU for fields we never read (docs/benchmarks.md, issue 13).
        # The body goes as bytes (`content`), mostly encoded once; the URL is absolute (the SDK
        # then parses it once instead of merging it into its base URL); the SDK's per-request
        # telemetry headers are omitted (see TELEMETRY_HEADERS). All public `post` arguments.
        raw = await api.post(
            f"{api.base_url}chat/completions",  # base_url always ends with "/" (the SDK sees to it)
            cast_to=httpx2.Response,
            content=request_body(model, messages, name, schema),
            options={"headers": {trace.JOB_HEADER: job_id, **_NO_REQUEST_TELEMETRY}},
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
        rules.classification_schema,
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
        api, model_for(job, s.answer_model), messages, "answer", rules.answer_schema, job.job_id
    )
    if not isinstance(doc.get("disposal_steps"), list) or not isinstance(doc.get("gaps", []), list):
        raise PermanentModelError("answer does not follow the schema")
    return doc
