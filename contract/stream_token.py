"""Signed stream URLs: a short-lived JWT (PyJWT, HS256) that lets one user follow one job.

The scan API puts it in the POST's `stream_url` (`?token=`); the gateway accepts it instead of the
auth proxy's `X-User-ID`, because a browser's EventSource cannot set headers. The token names the
job and its owner, so it opens exactly one stream, and it expires (`stream_token_ttl_s`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jwt

from contract.settings import Settings

ALGORITHM = "HS256"
AUDIENCE = "eco2-stream"
QUERY_PARAM = "token"


class InvalidToken(ValueError):
    """The token is malformed, tampered with, expired or for another job."""


@dataclass(frozen=True)
class StreamGrant:
    job_id: str
    user_id: str


def secret(s: Settings) -> str:
    """The signing key: `ECO2_STREAM_TOKEN_SECRET`, else one random key per checkout kept in
    `.local/stream-token.key` (every process of the local stack reads the same file)."""
    configured = s.stream_token_secret.get_secret_value()
    return configured or _local_key(s.local_dir / "stream-token.key")


@lru_cache(maxsize=8)
def _local_key(path: Path) -> str:
    """Read once per process (every stream and every POST needs it)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(secrets.token_urlsafe(48))
        tmp.chmod(0o600)
        with contextlib.suppress(FileExistsError):  # another process won the race: use its key
            os.link(tmp, path)
        tmp.unlink()
    return path.read_text().strip()


def issue(s: Settings, job_id: str, user_id: str, now: float | None = None) -> str:
    issued = int(now if now is not None else time.time())
    claims = {
        "aud": AUDIENCE,
        "sub": user_id,
        "job": job_id,
        "iat": issued,
        "exp": issued + s.stream_token_ttl_s,
    }
    return jwt.encode(claims, secret(s), algorithm=ALGORITHM)


def verify(s: Settings, token: str, job_id: str) -> StreamGrant:
    """The grant of a valid token for `job_id`; raises InvalidToken otherwise."""
    try:
        claims = jwt.decode(
            token,
            secret(s),
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            options={"require": ["exp", "sub", "job", "aud"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    if claims["job"] != job_id:
        raise InvalidToken("token is for another job")
    return StreamGrant(job_id=job_id, user_id=str(claims["sub"]))
