"""Bounded caller identities: the `X-User-ID` (and the gateway's dev `?user=`) and the
`X-Idempotency-Key`.

Both travel into Kafka records, Redis keys and Postgres rows, so they are checked before anything
reaches those: at most `ECO2_MAX_USER_ID_LEN` / `ECO2_MAX_IDEMPOTENCY_KEY_LEN` characters of a
printable ASCII set without blanks, quotes, `/` or `\\` (enough for a JWT `sub` such as
`auth0|64b1...`, an e-mail address or a UUID). The patterns are valid in Python and ECMAScript,
so the published OpenAPI schema says exactly what is accepted.
"""

from __future__ import annotations

import re
from typing import Any

# Letters, digits and . _ - ~ : @ | + = (no blanks, quotes, slashes, control or non-ASCII).
CHARSET = "A-Za-z0-9._~:@|+="
USER_ID_PATTERN = f"^[{CHARSET}-]+$"
IDEMPOTENCY_KEY_PATTERN = USER_ID_PATTERN
CHARSET_TEXT = "letters, digits and . _ - ~ : @ | + ="

_VALID = re.compile(f"[{CHARSET}-]+")


def problem(value: str, max_len: int) -> str | None:
    """Why `value` is no acceptable identity (None when it is)."""
    if not value:
        return "must not be empty"
    if len(value) > max_len:
        return f"is longer than {max_len} characters"
    if not _VALID.fullmatch(value):
        return f"may hold only {CHARSET_TEXT}"
    return None


def schema(max_len: int) -> dict[str, Any]:
    """The JSON Schema of a user id, as both services' OpenAPI documents publish it."""
    return {"type": "string", "minLength": 1, "maxLength": max_len, "pattern": USER_ID_PATTERN}
