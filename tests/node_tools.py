"""Runs the Node tools of tests/node/ (put into .local/node by `make node-tools`, run by make test)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from contract.settings import Settings

SCRIPTS = Path(__file__).resolve().parent / "node"


def node_dir(s: Settings) -> Path:
    d = s.local_dir / "node"
    if shutil.which("node") is None or not (d / "node_modules").is_dir():
        raise AssertionError(f"node or {d}/node_modules missing: run `make node-tools` (npm ci --prefix {d})")
    return d


def run_node(s: Settings, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"ECO2_NODE_DIR": str(node_dir(s)), "PATH": "/usr/local/bin:/usr/bin:/bin"},
    )
