"""What a quota decision looks like on the wire: `Retry-After`, `RateLimit` and `RateLimit-Policy`.

The fields follow draft-ietf-httpapi-ratelimit-headers-11 (structured-field lists):
`RateLimit-Policy: "scans";q=5;w=50, "inflight";q=3;qu="concurrent-requests"` and
`RateLimit: "scans";r=0;t=10`. A token bucket is advertised as `q` = its burst and `w` = the
seconds it takes to refill it whole; `t` of a refused limit equals `Retry-After` (the draft: it
must not name a point earlier than the effective window's end).
"""

from __future__ import annotations

from contract.settings import Settings

from .limits import Decision, Limit


def scan_policy(s: Settings) -> str:
    items = []
    if s.scan_burst > 0:
        window = max(1, round(s.scan_burst / max(s.scan_rate_per_min, 1e-6) * 60))
        items.append(f'"scans";q={s.scan_burst};w={window}')
    if s.inflight_max > 0:
        items.append(f'"inflight";q={s.inflight_max};qu="concurrent-requests"')
    return ", ".join(items)


def stream_policy(s: Settings) -> str:
    return f'"streams";q={s.streams_max};qu="concurrent-requests"' if s.streams_max > 0 else ""


def headers(d: Decision, s: Settings, policy: str) -> dict[str, str]:
    """The rate-limit fields of a response (none when no limit applies or Redis was skipped)."""
    if d.skipped or not policy:
        return {}
    items = []
    if d.scans_left is not None:
        t = d.retry_after_s if d.refused == "scans" else d.scans_full_s
        items.append(f'"scans";r={d.scans_left};t={t}')
    if d.inflight_left is not None:
        items.append(f'"inflight";r={d.inflight_left}')
    if d.streams_left is not None:
        items.append(f'"streams";r={d.streams_left}')
    out = {"RateLimit-Policy": policy}
    if items:
        out["RateLimit"] = ", ".join(items)
    if d.refused:
        out["Retry-After"] = str(max(d.retry_after_s, 1))
    return out


MESSAGES: dict[Limit, str] = {
    "scans": "too many scans: at most {burst} at once and {rate:g} a minute per user",
    "inflight": "too many scans in flight: at most {inflight} per user until one finishes",
    "streams": "too many open streams: at most {streams} per user across all gateways",
}


def message(limit: Limit, s: Settings) -> str:
    return (
        MESSAGES[limit].format(
            burst=s.scan_burst, rate=s.scan_rate_per_min, inflight=s.inflight_max, streams=s.streams_max
        )
        + "; retry after Retry-After seconds"
    )


# The fields as both services' OpenAPI documents describe them (producers/openapi.py, gateway/openapi.py).
OPENAPI_HEADERS: dict[str, dict[str, object]] = {
    "RateLimit": {
        "description": 'what is left of each limit that applies, e.g. `"scans";r=0;t=10` (remaining, '
        "seconds until the window is whole again); draft-ietf-httpapi-ratelimit-headers",
        "schema": {"type": "string"},
    },
    "RateLimit-Policy": {
        "description": 'the limits, e.g. `"scans";q=5;w=50, "inflight";q=3;qu="concurrent-requests"`',
        "schema": {"type": "string"},
    },
}
RETRY_AFTER_HEADER = {
    "description": "seconds until the refused limit lets the request through",
    "schema": {"type": "integer", "minimum": 1},
}


def openapi_description(limits: str) -> str:
    """The 429's description in either document."""
    return (
        f"a per-user quota ({limits}) refused the request: nothing was queued or opened; `limit` "
        "names the quota, Retry-After says when to come back (quota/, README 'Fair use')"
    )
