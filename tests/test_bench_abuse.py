"""`eco2 bench abuse` stays runnable (a tiny run against the stack, ~40 s) and its verdicts judge
(unit: a figure past the tolerance, a 5xx or a lost scan is a MISS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.abuse import compare
from contract.settings import Settings

from .conftest import eco2
from .test_bench_smoke import latency, report, verdicts


def load(completion: float, e2e: float, post_ms: float, lost: int = 0) -> dict[str, Any]:
    sse = {"lost": lost, "duplicated": 0, "unexpected": 0}
    return {
        "results": {
            "completion_rate": completion,
            "e2e_s": {"p95": e2e},
            "scan_api_ms": {"p95": post_ms},
            "sse": sse,
        }
    }


ABUSER = {"posts": {"202": 3, "429": 97}, "stream_opens": {"200": 5, "429": 95}, "http_5xx": 0}


def test_verdicts_hold_the_honest_users_to_five_percent() -> None:
    ok = verdicts({"targets": compare(load(1.0, 18.0, 20.0), load(1.0, 18.8, 20.9), ABUSER, 0)})
    assert set(ok.values()) == {"PASS"}, ok
    slow = verdicts({"targets": compare(load(1.0, 18.0, 20.0), load(0.94, 19.0, 21.1), ABUSER, 0)})
    assert slow["completion"] == slow["E2E p95 (s)"] == slow["Scan API p95 (ms)"] == "MISS", slow
    bad = verdicts(
        {
            "targets": compare(
                load(1.0, 18.0, 20.0), load(1.0, 18.0, 20.0, lost=1), {**ABUSER, "http_5xx": 2}, 1
            )
        }
    )
    assert bad["abuser 5xx"] == bad["abuser's accepted scans without a final result"] == "MISS", bad
    assert bad["honest users' SSE lost/duplicated/unexpected events"] == "MISS", bad
    unrefused = {**ABUSER, "posts": {"202": 100}, "stream_opens": {"200": 100}}
    assert (
        verdicts({"targets": compare(load(1, 1, 1), load(1, 1, 1), unrefused, 0)})["abuser refused with 429s"]
        == "MISS"
    )


@pytest.mark.integration
def test_abuse_smoke(tmp_path: Path, settings: Settings, stack_status: dict[str, Any]) -> None:
    before = latency(settings)
    args = ["--vus", "3", "--ramp-up", "2", "--hold", "6", "--ramp-down", "1", "--streams", "60"]
    args += ["--model-latency", "0.5,1", "--quiet", "--name", "smoke-abuse", "--out", str(tmp_path)]
    # Exit 2 = a MISS: a tiny run on a shared box may miss the 5% comparison; the rest must hold.
    proc = eco2("bench", "abuse", *args, timeout=240, check=False)
    assert proc.returncode in (0, 2), proc.stdout + proc.stderr
    rep = report(tmp_path, "smoke-abuse")
    assert latency(settings) == before  # restored
    v = verdicts(rep)
    for target in (
        "abuser refused with 429s",
        "abuser 5xx",
        "honest users' SSE lost/duplicated/unexpected events",
        "abuser's accepted scans without a final result",
    ):
        assert v[target] == "PASS", (target, rep["abuser"])
    ab = rep["abuser"]
    assert ab["posts"].get("202", 0) <= rep["quotas"]["scan_burst"] and ab["posts"]["429"] > 0, ab
    assert ab["most_streams_held"] <= rep["quotas"]["streams_max"], ab
    assert rep["alone"]["results"]["jobs_completed"] > 0 and rep["beside"]["results"]["jobs_completed"] > 0
