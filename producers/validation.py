"""Input checks of the scan API: bounded fields and no server-side request forgery via image_url.

The model provider fetches the image, but the URL still leaves our network boundary with our
credentials attached, so hosts that point inside (loopback, private, link-local, cloud metadata)
are refused whether written as a name, an IPv4/IPv6 literal or a numeric shortcut.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from contract.events import ScanRequest
from contract.settings import Settings

_BLOCKED_NAMES = ("localhost", "metadata.google.internal", "metadata", "instance-data")
_BLOCKED_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa")


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
    parts = urlsplit(url.strip())
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
    return url.strip()


def check_request(req: ScanRequest, s: Settings) -> ScanRequest:
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
