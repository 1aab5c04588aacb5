"""`python -m gateway`: the SSE gateway on ECO2_GATEWAY_HOST:ECO2_GATEWAY_PORT."""

from __future__ import annotations

import gc
import logging
import resource

import uvicorn

from contract.settings import get_settings

from .app import create_app


def raise_fd_limit() -> None:
    """Every client is a socket: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def main() -> None:
    s = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    raise_fd_limit()
    app = create_app(s)
    # Thousands of long-lived streams make many young objects; full collections then stall
    # delivery for hundreds of ms. Freeze start-up objects and collect young generations rarer.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    uvicorn.run(
        app,
        host=s.gateway_host,
        port=s.gateway_port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=75,  # above the clients' poll/reconnect gaps: no reset races
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
