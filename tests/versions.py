"""Records shaped as other schema versions (contract/versioning.py), for the consumers' tests.

- N-1, "legacy": no `v` at all (what every record written before versions were stamped looks like),
- N-1, "previous": `v` 1.0 spelled out,
- N+1, "next": the next minor, with fields this version does not know: top level, nested in a
  result, and a new optional stage result (`recycling_score`) as a newer worker would add it,
- "major": an unknown major, the only shape a consumer may refuse (dead-letter or skip).
"""

from __future__ import annotations

import json
from typing import Any

from contract import versioning

NEXT = f"{versioning.MAJOR}.{versioning.MINOR + 1}"
PREVIOUS = f"{versioning.MAJOR}.{versioning.MINOR - 1}"
MAJOR = f"{versioning.MAJOR + 1}.0"
READABLE = ("legacy", "previous", "next")
NEW_STAGE_RESULT = {"recycling_score": {"score": 0.87, "model": "scorer-2"}}
NEW_FIELDS = {"region": "kr-seoul", "trace_tags": ["canary"]}


def shaped(record: dict[str, Any], shape: str, *, finding: bool = False) -> dict[str, Any]:
    """`record` (a model_dump of this version) as `shape` writes it. `finding`: a job or result
    that carries the newer worker's stage result. An event's `result` is reshaped with it."""
    out = dict(record)
    if isinstance(out.get("result"), dict):
        out["result"] = shaped(out["result"], shape, finding=True)
    if shape == "legacy":
        out.pop(versioning.FIELD, None)
    elif shape == "previous":
        out[versioning.FIELD] = PREVIOUS
    elif shape == "next":
        out[versioning.FIELD] = NEXT
        out.update(NEW_FIELDS)
        if finding:
            out.update(NEW_STAGE_RESULT)
    elif shape == "major":
        out[versioning.FIELD] = MAJOR
    else:
        raise ValueError(shape)
    return out


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode()
