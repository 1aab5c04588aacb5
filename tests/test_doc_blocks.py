"""The README's and docs/operations.md's shell blocks, run as written against the local stack.

Every ```sh block says what it is: `safe` (runs against the local stack without changing what
others rely on: this test runs it), `kcat-runbook NAME` (tests/test_runbook.py runs it with known
records), `dlq-replay-pod` (tests/test_deploy.py checks it against the manifests) or `manual`
(it changes the stack, needs a cluster or is a synopsis). A new block without a word fails here,
so the docs cannot drift from the commands unseen.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from contract.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "docs" / "operations.md"]
FENCE = re.compile(r"^```sh(?P<info>[^\n]*)\n(?P<body>.*?)^```", re.M | re.S)
KINDS = re.compile(r"safe|manual|dlq-replay-pod|kcat-runbook [\w-]+")


def blocks(kind: str | None = None) -> list[tuple[str, int, str, str]]:
    """(file, line, info, body) of every ```sh block, or of those whose info is `kind`."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            info = m.group("info").strip()
            if kind is None or info == kind:
                out.append((path.name, text[: m.start()].count("\n") + 1, info, m.group("body")))
    return out


def test_every_shell_block_says_whether_it_is_run() -> None:
    found = blocks()
    assert len(found) >= 10, found
    unmarked = [(f, line, info) for f, line, info, _ in found if not KINDS.fullmatch(info)]
    assert not unmarked, f"shell blocks without safe/manual/kcat-runbook NAME: {unmarked}"
    assert len(blocks("safe")) >= 2


def local(body: str, s: Settings) -> str:
    """The block for this checkout's ports (the docs show the defaults)."""
    defaults = Settings.model_fields
    for field, host in (("api_port", s.api_host), ("gateway_port", s.gateway_host)):
        body = body.replace(f"localhost:{defaults[field].default}", f"{host}:{getattr(s, field)}")
    return body.replace(
        f"127.0.0.1:{defaults['kafka_bootstrap'].default.rsplit(':', 1)[1]}", s.kafka_bootstrap
    )


@pytest.mark.integration
@pytest.mark.parametrize("where", [f"{f}:{line}" for f, line, _, _ in blocks("safe")])
def test_safe_block_runs(
    where: str, settings: Settings, stack_status: dict[str, object], zero_latency_model: str, tmp_path: Path
) -> None:
    body = next(b for f, line, _, b in blocks("safe") if f"{f}:{line}" == where)
    script = "set -euo pipefail\n" + local(body, settings)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, (
        f"{where} failed ({proc.returncode}):\n{script}\n{proc.stdout}\n{proc.stderr}"
    )
