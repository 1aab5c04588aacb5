"""Consumers bind /metrics, /health, /ready where ECO2_METRICS_HOST says: loopback locally."""

from __future__ import annotations

import socket
import subprocess

import pytest

from contract.settings import Settings
from streams.health import serve


def test_the_endpoint_binds_loopback_unless_told_otherwise() -> None:
    assert Settings().metrics_host == "127.0.0.1"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve(port, None)
    assert server is not None
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_the_stacks_consumer_ports_listen_on_loopback_only(settings: Settings, stack_status: dict) -> None:
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    ports = [settings.workers_metrics_port, settings.router_metrics_port, settings.writer_metrics_port]
    for port in ports:
        addrs = {
            line.split()[3].rsplit(":", 1)[0]
            for line in listening.splitlines()
            if line.split()[3].rsplit(":", 1)[1] == str(port)
        }
        assert addrs == {"127.0.0.1"}, f"port {port} listens on {addrs}"
