"""What the writer makes of one `scan.events` record: skip it, store its result, or dead-letter it.

Only terminal events (`contract.pipeline.is_terminal`: done, or failed) are stored; their
`result` is the whole ScanResult. A terminal event that cannot be stored as it is (not JSON, not a
valid event, no or an invalid result) is bad data: no retry can fix it, so it goes to the
dead-letter topic at once. So is any record of a schema major this writer cannot read
(contract/versioning.py): it cannot even tell whether it is terminal. Other versions of the same
major are read, their unknown fields ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from contract import pipeline, versioning
from contract.events import Reward, ScanEvent, ScanResult


@dataclass(frozen=True)
class Bad:
    """A record that can never be stored as it is."""

    reason: str  # not_json | unknown_version | invalid_event | invalid_result
    error: str
    value: dict[str, Any]  # the original value ({"raw": text} when it was not a JSON object)


@dataclass(frozen=True)
class Ownership:
    user_id: str
    character_code: str
    job_id: str
    acquired_at: float


def decode(raw: bytes | None) -> dict[str, Any] | Bad:
    text = (raw or b"").decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except ValueError as exc:
        return Bad("not_json", f"not JSON: {exc}", {"raw": text})
    if not isinstance(value, dict):
        return Bad("not_json", f"not a JSON object but {type(value).__name__}", {"raw": text})
    return value


def is_terminal(value: dict[str, Any]) -> bool:
    return pipeline.is_terminal(value.get("stage"), value.get("status"))


def parse(raw: bytes | None) -> ScanResult | Bad | None:
    """The result to store, the reason it cannot be stored, or None for a non-terminal event."""
    value = decode(raw)
    if isinstance(value, Bad):
        return value
    if not versioning.readable(value):
        return Bad("unknown_version", f"schema version {value.get(versioning.FIELD)!r} cannot be read", value)
    if not is_terminal(value):
        return None
    return result_of(value)


def result_of(value: dict[str, Any]) -> ScanResult | Bad:
    """Validate a terminal event and its result (everything the tables rely on)."""
    try:
        ev = ScanEvent.model_validate(value)
    except ValidationError as exc:
        return Bad("invalid_event", _brief(exc), value)
    if ev.result is None:
        return Bad("invalid_result", "terminal event without a result", value)
    try:
        result = ScanResult.model_validate(ev.result)
        reward = Reward.model_validate(result.reward) if result.reward is not None else None
    except ValidationError as exc:
        return Bad("invalid_result", _brief(exc), value)
    expected = "failed" if ev.status == "failed" else "completed"
    problems = []
    if result.job_id != ev.job_id:
        problems.append(f"result.job_id {result.job_id!r} is not the event's {ev.job_id!r}")
    if result.user_id != ev.user_id:
        problems.append(f"result.user_id {result.user_id!r} is not the event's {ev.user_id!r}")
    if result.status != expected:
        problems.append(f"result.status is {result.status!r} on a {ev.stage}/{ev.status} event")
    if reward is not None and reward.granted and not reward.character_code:
        problems.append("reward granted without a character_code")
    if problems:
        return Bad("invalid_result", "; ".join(problems), value)
    return result


def ownership_of(result: ScanResult) -> Ownership | None:
    """The character a completed scan granted (validated by `result_of`), if any."""
    reward = result.reward
    if result.status != "completed" or not reward or not reward.get("granted"):
        return None
    return Ownership(result.user_id, reward["character_code"], result.job_id, result.finished_at)


def _brief(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())
