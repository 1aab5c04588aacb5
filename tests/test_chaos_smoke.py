"""`eco2 chaos` in seconds (the real run takes minutes): the harness kills and restarts stack
components and wipes Redis, then checks and reports; this keeps it from rotting.

It disturbs the stack on purpose (router and gateway killed, Redis flushed) and leaves it whole:
the command waits until every component answers and the view is rebuilt before it reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import ChaosConfig
from contract.settings import Settings

from .conftest import eco2


def test_faults_are_spread_over_the_hold() -> None:
    cfg = ChaosConfig(hold_s=200, ramp_up_s=10, warmup_s=15)
    assert cfg.spacing_s == pytest.approx((10 + 200 - 15 - 20) / 9)
    assert cfg.faults[-1] == "flush" and {"api", "workers", "router", "gateway", "writer"} <= set(cfg.faults)


@pytest.mark.integration
def test_chaos_smoke(tmp_path: Path, settings: Settings, stack_status: dict[str, Any]) -> None:
    proc = eco2(
        *("chaos", "--vus", "2", "--hold", "10", "--warmup", "4", "--faults", "router,gateway,flush"),
        *(
            "--model-latency",
            "0",
            "--settle",
            "60",
            "--quiet",
            "--name",
            "smoke-chaos",
            "--out",
            str(tmp_path),
        ),
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [path] = tmp_path.glob("smoke-chaos-*.json")
    rep = json.loads(path.read_text())
    assert {p.suffix for p in tmp_path.glob("smoke-chaos-*")} == {".json", ".md", ".png"}
    r = rep["results"]
    assert r["jobs_accepted"] > 0 and r["jobs_with_one_terminal_row"] == r["jobs_accepted"]
    assert r["late_joiners"]["read"] == r["jobs_accepted"]
    assert [f["what"] for f in rep["timeline"]] == ["router", "gateway", "flush"]
    assert all(f["back_s"] is not None and f["error"] is None for f in rep["timeline"])
    assert all(t["verdict"] == "PASS" for t in rep["targets"]), rep["targets"]
    status = json.loads(eco2("stack", "status", "--json").stdout)["services"]
    assert all(info["up"] for info in status.values()), status


@pytest.mark.integration
def test_chaos_rollout_smoke(tmp_path: Path, settings: Settings, stack_status: dict[str, Any]) -> None:
    """`eco2 chaos --rollout` in seconds: every app component SIGTERMed and restarted in turn."""
    proc = eco2(
        *("chaos", "--rollout", "--vus", "3", "--hold", "20", "--warmup", "3", "--model-latency", "0.5,1"),
        *("--settle", "60", "--quiet", "--name", "smoke-rollout", "--out", str(tmp_path)),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [path] = tmp_path.glob("smoke-rollout-*.json")
    rep = json.loads(path.read_text())
    r = rep["results"]
    assert [f["what"] for f in rep["timeline"]] == ["workers", "router", "writer", "gateway", "api"]
    assert all(f["action"] == "SIGTERM, restart" and f["drain_s"] is not None for f in rep["timeline"])
    assert r["jobs_accepted"] > 0 and r["jobs_with_one_terminal_row"] == r["jobs_accepted"]
    assert r["model_calls"]["jobs"] == r["jobs_completed"] > 0
    assert r["model_calls"]["calls"] == 2 * r["jobs_completed"]
    assert all(t["verdict"] == "PASS" for t in rep["targets"]), rep["targets"]
