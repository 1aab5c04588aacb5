"""Input checks of the scan API: bounded fields and no server-side request forgery via image_url.

The model provider fetches the image, but the URL still leaves our network boundary with our
credentials attached, so hosts that point inside (loopback, private, link-local, cloud metadata)
are refused whether written as a name, an IPv4/IPv6 literal or a numeric shortcut.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from contract.events import ScanRequest
from contract.settings import Settings

_BLOCKED_NAMES = ("localhost", "metadata.google.internal", "metadata", "instance-data")
_BLOCKED_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa")

# The published shape of image_url (OpenAPI `pattern`), enforced here as well, so the schema says
# exactly what is accepted: http(s), a DNS host name with an alphabetic top-level label (no IP
# literals, no credentials), an optional port, then anything without whitespace or control
# characters. Written for both Python's re and ECMAScript (no flags, no lookarounds).
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# Whitespace and control characters spelled out: `\s` differs between Python and ECMAScript.
_BLANK = r"\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_TAIL = rf"(?::[0-9]{{1,5}})?(?:[/?#][^{_BLANK}]*)?$"


def _ci(text: str) -> str:
    """A host name or word as a case-insensitive regex without flags (JSON Schema patterns have
    none); host names hold only letters, digits, `-` and `.`."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else "\\." if c == "." else c for c in text)


def image_url_pattern(s: Settings) -> str:
    return _url_regex(tuple(s.image_host_allowlist)).pattern


@lru_cache(maxsize=8)
def _url_regex(allowlist: tuple[str, ...]) -> re.Pattern[str]:
    if allowlist:
        hosts = "|".join(_ci(h.lower().strip(".")) for h in allowlist)
        host = f"(?:{_LABEL}\\.)*(?:{hosts})"
    else:
        host = f"(?:{_LABEL}\\.)+[A-Za-z]{{2,63}}"
    return re.compile(f"^{_ci('http')}[sS]?://{host}{_TAIL}")


def internal_host_pattern() -> str:
    """Matches URLs whose host ends in a suffix reserved for internal names (schema `not`)."""
    suffixes = "|".join(_ci(x.lstrip(".")) for x in _BLOCKED_SUFFIXES)
    return f"^[^:]+://(?:[^/?#:]*\\.)?(?:{suffixes})(?::[0-9]*)?(?:[/?#]|$)"


class InvalidInput(ValueError):
    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    # Numeric shortcuts the resolver accepts: 2130706433, 0x7f000001, 0177.0.0.1, 127.1
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or ip in ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT
    )


def check_image_url(url: str, s: Settings) -> str:
    if len(url) > s.max_image_url_len:
        raise InvalidInput(
            "image_url_too_long", f"image_url is longer than {s.max_image_url_len} characters", "image_url"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInput("image_url_scheme", "image_url must be an http(s) URL", "image_url")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise InvalidInput("image_url_host", "image_url has no host", "image_url")
    if parts.username or parts.password:
        raise InvalidInput("image_url_credentials", "image_url must not carry credentials", "image_url")
    if s.image_host_allowlist:
        allowed = any(host == h or host.endswith("." + h) for h in s.image_host_allowlist)
        if not allowed:
            raise InvalidInput(
                "image_url_host_not_allowed", f"image host {host!r} is not on the allow-list", "image_url"
            )
    if host in _BLOCKED_NAMES or host.endswith(_BLOCKED_SUFFIXES):
        raise InvalidInput("image_url_internal", f"image host {host!r} is internal", "image_url")
    ip = _literal_ip(host)
    if ip is not None and _internal(ip):
        raise InvalidInput("image_url_internal", f"image host {host!r} is a non-public address", "image_url")
    if not _url_regex(tuple(s.image_host_allowlist)).fullmatch(url):
        raise InvalidInput(
            "image_url_format",
            "image_url must be http(s)://host.name[:port][/path] with a DNS host name (no IP address), "
            "without whitespace or control characters",
            "image_url",
        )
    return url


def _check_unicode(req: ScanRequest) -> None:
    """JSON may escape lone surrogates (`"\\udc00"`); they are no text and cannot go to Kafka."""
    for field in ("image_url", "user_input", "model"):
        value: str | None = getattr(req, field)
        try:
            if value is not None:
                value.encode()
        except UnicodeEncodeError:
            raise InvalidInput("invalid_text", f"{field} is not valid Unicode text", field) from None


def check_request(req: ScanRequest, s: Settings) -> ScanRequest:
    _check_unicode(req)
    url = check_image_url(req.image_url, s)
    if req.user_input is not None and len(req.user_input) > s.max_user_input_len:
        raise InvalidInput(
            "user_input_too_long",
            f"user_input is longer than {s.max_user_input_len} characters",
            "user_input",
        )
    if req.model is not None and req.model not in s.supported_models:
        raise InvalidInput(
            "unknown_model",
            f"unknown model {req.model!r}; supported: {', '.join(s.supported_models)}",
            "model",
        )
    return req.model_copy(update={"image_url": url})


def request_schema(s: Settings) -> dict[str, Any]:
    """The JSON Schema of a scan request with every limit `check_request` enforces."""
    return {
        "type": "object",
        "title": "ScanRequest",
        "required": ["image_url"],
        "properties": {
            "image_url": {
                "type": "string",
                "maxLength": s.max_image_url_len,
                "pattern": image_url_pattern(s),
                "not": {"pattern": internal_host_pattern()},
                "description": "http(s) URL of the photo. The host must be a public DNS name "
                "(no IP literals, no credentials, no internal suffix such as .local or .internal"
                + (f"; one of {', '.join(s.image_host_allowlist)} or below" if s.image_host_allowlist else "")
                + ").",
                "examples": ["https://images.example.com/scans/clear_pet-bottle-label_attached.jpg"],
            },
            "user_input": {
                "anyOf": [{"type": "string", "maxLength": s.max_user_input_len}, {"type": "null"}],
                "description": "what the user says about the item",
            },
            "model": {
                "anyOf": [{"type": "string", "enum": list(s.supported_models)}, {"type": "null"}],
                "description": f"the vision model; default {s.vision_model}",
            },
        },
    }
