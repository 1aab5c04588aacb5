"""The gateway's published contract: the SSE operation, its event names, ids, auth and statuses.

FastAPI cannot describe a stream; this module writes down what a client may rely on, so the app
team (and schemathesis) can check the gateway against it. The event names come from
`contract.events`, so the document and the stream cannot disagree.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from contract import identity
from contract.events import (
    DONE,
    DONE_SEQ,
    FAILED_EVENT,
    FAILED_SEQ,
    QUEUED,
    SSE_EVENTS,
    STAGES,
    ScanEvent,
    seq_of,
)
from contract.pipeline import ATTEMPT_SPAN, first_seq
from contract.settings import Settings
from quota import refusal

EVENTS_OPERATION = "streamScanEvents"


class GatewayError(BaseModel):
    """Every refusal of the gateway (FastAPI's shape)."""

    detail: str
    limit: Literal["streams"] | None = Field(default=None, description="429: the quota that refused")
    retry_after_s: int | None = Field(default=None, description="429: as the Retry-After header")


def _refusal(description: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": GatewayError,
        "description": description,
        "content": {"application/json": {"example": {"detail": detail}}},
        **extra,
    }


def stream_description(s: Settings) -> str:
    stages = ", ".join(f"`{x}`" for x in STAGES)
    return f"""The job's progress as Server-Sent Events, from `Last-Event-ID` to its terminal event.

**Who may follow.** The job's owner: either the auth proxy's `X-User-ID` header, or the `token`
query parameter of the `stream_url` the scan API returned (a JWT bound to this job and user, valid
{s.stream_token_ttl_s} s; EventSource cannot set headers, so browsers use it). A missing or
invalid token is a 401; someone else's job or an unknown one is the same 404.

**Events.** Each event is `event: NAME`, `id: SEQ`, `data: EVENT-JSON` (the ScanEvent on
`scan.events`). NAME is the stage ({stages}) or `{FAILED_EVENT}` for the job's failure; never
`error`, which EventSource reserves for its own connection errors. SEQ is the event's position in
the job: {QUEUED} {seq_of(QUEUED, "completed")}, each stage's `started` 10*n and `completed` 10*n+1, {DONE}
{DONE_SEQ}, {FAILED_EVENT} {FAILED_SEQ}. Every seq is delivered once and in order, whatever the reconnects.

**Terminal events.** `{DONE}` (success, carries the result) and `{FAILED_EVENT}` (carries the failed
result and `error`) end the stream; the server closes it after them.

**Reconnecting.** Send `Last-Event-ID` (EventSource does this by itself): the stream resumes after
that seq. A finished job with nothing after it answers 204, which stops EventSource.

**Attempts: a failed job may come back.** An operator may re-drive a failed job (`eco2 dlq
replay`): a new attempt of the same job, same id, stream and result URL. Each event carries
`attempt` (0 first); attempt n's seqs are attempt 0's plus {ATTEMPT_SPAN}*n (its `{QUEUED}`
{first_seq(1)} for n=1, its `{DONE}` {ATTEMPT_SPAN + DONE_SEQ}), above every seq of the attempts before, and
the first event after a `{FAILED_EVENT}` {FAILED_SEQ} is the next attempt's `{QUEUED}`. So a client
that saw `{FAILED_EVENT}` and opens the stream again with its seq as `Last-Event-ID` gets 204 while
no re-drive has come, then, once one has, the new attempt's events in order from its `{QUEUED}` on
(the result URL meanwhile reports the running job again). A stream that reads a failure followed
by a later attempt (history) goes on with it instead of ending.

**Keepalive.** After {s.keepalive_s:g} s without an event the server writes the comment
`: keepalive`. A stream is closed after {s.max_stream_s:g} s at the latest; reconnect to go on.
"""


def events_responses(s: Settings) -> dict[int | str, dict[str, Any]]:
    first = seq_of(QUEUED, "completed")
    example = (
        f'event: {QUEUED}\nid: {first}\ndata: {{"event_id": "…:{first}", "stage": "{QUEUED}", '
        '"status": "completed", …}\n\n'
        ": keepalive\n\n"
        f'event: {DONE}\nid: {DONE_SEQ}\ndata: {{"stage": "{DONE}", "status": "completed", '
        '"result": {…}, …}\n\n'
    )
    return {
        200: {
            "description": f"the event stream; event names: {', '.join(SSE_EVENTS)}. The schema "
            "describes one event (as OpenAPI 3.2's itemSchema does); `data` is a ScanEvent.",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA, "example": example}},
        },
        204: {"description": "the job is finished and nothing follows Last-Event-ID: do not reconnect"},
        400: _refusal(
            f"the user id (X-User-ID, or the development `user` query) is longer than "
            f"{s.max_user_id_len} characters or holds any but {identity.CHARSET_TEXT}",
            "the user id is longer than 128 characters",
        ),
        401: _refusal(
            "neither X-User-ID nor a valid token (missing, malformed, tampered, expired, another job's)",
            "missing X-User-ID or stream token",
        ),
        404: _refusal("no such job, or not the caller's (the two are indistinguishable)", "job not found"),
        429: _refusal(
            refusal.openapi_description("streams a user has open across all gateways"),
            refusal.message("streams", s),
            headers={"Retry-After": refusal.RETRY_AFTER_HEADER, **refusal.OPENAPI_HEADERS},
        ),
        503: _refusal(
            "the gateway is full, cannot read the job's state, or the job's event history is not back "
            "yet after Redis lost it (a stream is first held up to ECO2_VIEW_WAIT_S; the log is "
            "replayed newest first and a job is served as soon as its own history is whole, never "
            "a part of it); retry after Retry-After seconds",
            "too many streams on this gateway; retry shortly",
            headers={"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
        ),
    }


class Readiness(BaseModel):
    redis: bool
    pubsub: bool
    streams: int


READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Readiness, "description": "Redis and the pub/sub connection answer"},
    503: {"model": Readiness, "description": "Redis or the pub/sub connection is down"},
}

EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "id", "data"],
    "properties": {
        "event": {"type": "string", "enum": list(SSE_EVENTS)},
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the event's seq"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/ScanEvent"},
        },
    },
}


def complete(doc: dict[str, Any], s: Settings) -> None:
    """Fill in what the route cannot say: parameter schemas and the token security scheme."""
    op = doc["paths"]["/api/v1/scan/{job_id}/events"]["get"]
    op["description"] = stream_description(s)
    # Either credential will do: the token (a security scheme) or the auth proxy's X-User-ID.
    op["security"] = [*op.get("security", []), {}]
    op["responses"]["200"]["content"].pop("application/json", None)
    if s.gateway_allow_user_query:
        op["parameters"].append(
            {
                "name": "user",
                "in": "query",
                "required": False,
                "schema": identity.schema(s.max_user_id_len),
                "description": "DEVELOPMENT ONLY (ECO2_GATEWAY_ALLOW_USER_QUERY): the caller's user id",
            }
        )
    for param in op.get("parameters", []):
        name = param["name"]
        if name == "Last-Event-ID":
            param["description"] = "the seq of the last event received; not a number counts as 0"
        elif name == "X-User-ID":
            # An empty header counts as none (the token then authenticates).
            empty_ok = identity.USER_ID_PATTERN.replace("]+", "]*")
            param["schema"] = {**identity.schema(s.max_user_id_len), "pattern": empty_ok}
            param["schema"].pop("minLength")
        elif name == "job_id":
            param["schema"] = {"type": "string", "minLength": 1, "maxLength": MAX_JOB_ID_LEN}
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["ScanEvent"] = ScanEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for ops in doc["paths"].values():
        for o in ops.values():
            o.get("responses", {}).pop("422", None)  # the gateway validates nothing FastAPI's way


MAX_JOB_ID_LEN = 128
