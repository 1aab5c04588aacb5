"""The scan API's published contract: response models, error examples, links and the request schema.

FastAPI derives most of `/openapi.json` from the routes; this module adds what it cannot know: the
request limits `validation.py` enforces, one documented error body per status with an example,
`Location`/`Retry-After` headers and the links from a POST's `job_id` to the result and the
gateway's event stream (what a client, or schemathesis' stateful phase, follows next).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from contract import identity, trace
from contract.events import SSE_EVENTS, ScanResult
from contract.settings import Settings
from quota import refusal

from .validation import request_schema

RESULT_OPERATION = "getScanResult"
EVENTS_OPERATION = "streamScanEvents"  # the gateway's operation (gateway/openapi.py)
EVENTS_PATH_POINTER = "/paths/~1api~1v1~1scan~1{job_id}~1events/get"


class ScanAccepted(BaseModel):
    job_id: str = Field(description="the job's id (32 hex digits)")
    status: Literal["queued"]
    stream_url: str = Field(
        description="the job's SSE stream on the gateway, with a short-lived `token` bound to the "
        "job and the caller: open it with EventSource as it is"
    )
    result_url: str = Field(description="where the result appears (also the `Location` header)")


class ScanProgress(BaseModel):
    job_id: str
    status: Literal["processing"]
    current_stage: str = Field(description="the stage of the latest event: " + ", ".join(SSE_EVENTS[:-1]))
    progress: int = Field(ge=0, le=100)


class FieldProblem(BaseModel):
    field: str
    problem: str


class ApiError(BaseModel):
    """Every error of the scan API: a machine-readable code and a sentence for people."""

    error: str = Field(description="machine-readable code, e.g. image_url_internal")
    message: str
    field: str | None = Field(default=None, description="the request field at fault, if one is")
    details: list[FieldProblem] | None = None
    job_id: str | None = Field(default=None, description="409: the job the key already names")
    limit: Literal["scans", "inflight"] | None = Field(
        default=None, description="429: the quota that refused"
    )
    retry_after_s: int | None = Field(default=None, description="429: as the Retry-After header")


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool] = Field(description="redis, kafka")


READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Readiness, "description": "Redis and Kafka answer"},
    503: {"model": Readiness, "description": "Redis or Kafka does not answer"},
}


def _error(description: str, examples: dict[str, tuple[str, str]], **extra: Any) -> dict[str, Any]:
    """A documented error response: the ApiError schema plus one example per code."""
    return {
        "model": ApiError,
        "description": description,
        "content": {
            "application/json": {
                "examples": {
                    name: {"value": {"error": code, "message": message}}
                    for name, (code, message) in examples.items()
                }
            }
        },
        **extra,
    }


RETRY_AFTER = {"description": "seconds to wait before asking again", "schema": {"type": "integer"}}
TRACEPARENT = {
    "description": "W3C trace context of the job (also on its Kafka messages)",
    "schema": {"type": "string", "pattern": trace.PATTERN},
}
UNAUTHENTICATED = _error(
    "no X-User-ID header (the auth proxy sets it)",
    {"unauthenticated": ("unauthenticated", "the X-User-ID header is required")},
)


def submit_responses(s: Settings) -> dict[int | str, dict[str, Any]]:
    location = {"description": "the result URL (= result_url)", "schema": {"type": "string"}}
    return {
        202: {
            "model": ScanAccepted,
            "description": "queued: the job and its `queued` event are committed to Kafka. A repeat "
            "with the same X-Idempotency-Key and body returns the same job.",
            "headers": {"Location": location, "traceparent": TRACEPARENT, **refusal.OPENAPI_HEADERS},
            "links": {
                "GetResult": {
                    "operationId": RESULT_OPERATION,
                    "parameters": {"job_id": "$response.body#/job_id"},
                    "description": "poll the result of the job just queued",
                },
                "FollowEvents": {
                    "operationRef": f"{_gateway(s)}/openapi.json#{EVENTS_PATH_POINTER}",
                    "parameters": {"job_id": "$response.body#/job_id"},
                    "description": "follow the job's progress on the SSE gateway (its own document "
                    "and server), or simply open stream_url, which carries the token",
                },
            },
        },
        400: _error(
            "invalid input; `error` names the problem, `field` the field",
            {
                "scheme": ("image_url_scheme", "image_url must be an http(s) URL"),
                "internal": ("image_url_internal", "image host '10.0.0.1' is a non-public address"),
                "format": ("image_url_format", "image_url must be http(s)://host.name[:port][/path] ..."),
                "too_long": ("image_url_too_long", f"image_url is longer than {s.max_image_url_len} chars"),
                "model": ("unknown_model", f"unknown model 'x'; supported: {', '.join(s.supported_models)}"),
                "host": ("image_url_host", "image_url has no host"),
                "credentials": ("image_url_credentials", "image_url must not carry credentials"),
                "not_allowed": ("image_url_host_not_allowed", "image host 'x.com' is not on the allow-list"),
                "user_input": (
                    "user_input_too_long",
                    f"user_input is longer than {s.max_user_input_len} characters",
                ),
                "text": ("invalid_text", "user_input is not valid Unicode text"),
                "key": (
                    "invalid_idempotency_key",
                    f"X-Idempotency-Key is longer than {s.max_idempotency_key_len} characters",
                ),
                "user": ("invalid_user_id", f"X-User-ID may hold only {identity.CHARSET_TEXT}"),
                "body": ("invalid_request", "the request is not a valid scan request"),
            },
        ),
        401: UNAUTHENTICATED,
        413: _error(
            f"the body is larger than {s.max_body_bytes} bytes",
            {"too_large": ("body_too_large", f"request body is larger than {s.max_body_bytes} bytes")},
        ),
        409: _error(
            "the X-Idempotency-Key was already used by this user with a different body",
            {"reused": ("idempotency_key_reused", "X-Idempotency-Key was used with a different body")},
        ),
        429: _error(
            refusal.openapi_description("scans a user may post, jobs a user has in flight"),
            {
                "scans": ("rate_limited", refusal.message("scans", s)),
                "inflight": ("rate_limited", refusal.message("inflight", s)),
            },
            headers={"Retry-After": refusal.RETRY_AFTER_HEADER, **refusal.OPENAPI_HEADERS},
        ),
        503: _error(
            f"Kafka did not take the job within {s.api_submit_timeout_s:g} s (or Redis is down): not "
            "accepted, retry after Retry-After seconds (the same X-Idempotency-Key is safe)",
            {
                "unavailable": ("unavailable", "could not queue the scan: TimeoutError"),
                "redis": ("unavailable", "state store unavailable: ConnectionError"),
            },
            headers={"Retry-After": RETRY_AFTER},
        ),
    }


def result_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"model": ScanResult, "description": "the final result (completed or failed)"},
        202: {
            "model": ScanProgress,
            "description": "still running: poll again after Retry-After seconds",
            "headers": {
                "Retry-After": RETRY_AFTER,
                "Location": {"description": "this result URL", "schema": {"type": "string"}},
            },
        },
        400: _error(
            "the X-User-ID is longer than ECO2_MAX_USER_ID_LEN or holds a character outside its set",
            {"user": ("invalid_user_id", f"X-User-ID may hold only {identity.CHARSET_TEXT}")},
        ),
        401: UNAUTHENTICATED,
        404: _error(
            "no such job, or not the caller's (the two are indistinguishable)",
            {"not_found": ("not_found", "no such scan")},
        ),
        503: _error(
            "the job state is being rebuilt from the log after Redis lost it, this job's history is "
            "not back yet (the log is replayed newest first: recent jobs come back within seconds) "
            "and the job is not finished in Postgres, or Redis/Postgres does not answer: retry after "
            "Retry-After seconds",
            {
                "rebuilding": ("rebuilding", "scan state is being rebuilt; retry shortly"),
                "unavailable": ("unavailable", "state store unavailable: ConnectionError"),
            },
            headers={"Retry-After": RETRY_AFTER},
        ),
    }


def _gateway(s: Settings) -> str:
    return (s.public_base_url or s.gateway_url).rstrip("/")


def user_header(s: Settings) -> dict[str, Any]:
    return {
        **identity.schema(s.max_user_id_len),
        "description": "the caller's user id, set by the auth proxy after it authenticated the user "
        f"(a missing header is a 401; more than {s.max_user_id_len} characters or any but "
        f"{identity.CHARSET_TEXT} a 400)",
    }


def complete(doc: dict[str, Any], s: Settings) -> None:
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "X-User-ID":
                    schema = user_header(s)
                    param.update(required=True, schema=schema, description=schema["description"])
            # Invalid input is a 400 ApiError here (see api.invalid), never FastAPI's 422 shape.
            if "422" in op.get("responses", {}) and "ValidationError" in str(op["responses"]["422"]):
                del op["responses"]["422"]
    submit = doc["paths"]["/api/v1/scan"]["post"]
    submit.setdefault("parameters", []).append(
        {
            "name": "traceparent",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "W3C trace context to continue; when it is not a valid traceparent the "
            "job starts a new trace (see the 202's traceparent header)",
        }
    )
    for param in submit.get("parameters", []):
        if param["name"] == "X-Idempotency-Key":
            param["schema"] = {
                "type": "string",
                "minLength": 1,
                "maxLength": s.max_idempotency_key_len,
                "pattern": identity.IDEMPOTENCY_KEY_PATTERN,
            }
            param["description"] = (
                "makes the POST safe to retry: the same key with the same body returns the same job "
                f"for {s.idempotency_ttl_s} s after its first use; the same key with another body "
                "is a 409. Keys are per user."
            )
    submit["requestBody"] = {
        "description": f"at most {s.max_body_bytes} bytes; a larger body is a 413 whatever it holds",
        "required": True,
        "content": {"application/json": {"schema": request_schema(s)}},
    }
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError", "ScanRequest"):
        schemas.pop(name, None)
