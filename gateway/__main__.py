"""`python -m gateway`: the SSE gateway on ECO2_GATEWAY_HOST:ECO2_GATEWAY_PORT."""

from __future__ import annotations

import gc
import logging
import resource
import socket

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
    config = uvicorn.Config(
        app,
        host=s.gateway_host,
        port=s.gateway_port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=75,  # above the clients' poll/reconnect gaps: no reset races
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    if s.gateway_processes > 1:
        server.run(sockets=[shared_socket(s.gateway_host, s.gateway_port)])
    else:
        server.run()


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket several gateway processes bind together (SO_REUSEPORT): the kernel
    spreads new connections over them. Each process has its own Redis pub/sub connection and
    serves any job (history + live come from Redis), so no stickiness is needed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    main()
