"""The box reference: CPU seconds of two fixed pure-Python loops, recorded in every report.

Absolute milliseconds do not carry from one box to another (issue 19: the same code ran 1.4x
faster on another box), so every report also says how fast its box ran a fixed piece of Python:
adding 20 million integers in a `for` loop, and encoding + decoding a scan event with `json`
50,000 times. Dividing a CPU figure by the loop's seconds gives it in box-independent units:
"ms of CPU on a box whose loop takes 1 s". CPU time (not wall time), measured in this process
while it runs alone in it; a busy box still slows it somewhat (shared caches, SMT, clocks), which
is why `eco2 bench ab` measures it before every run and reports its spread.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from typing import Any

LOOP_N = 20_000_000
JSON_N = 50_000
# One scan event as the stack moves it (its size and shape, not its exact content, matter).
_EVENT: dict[str, Any] = {
    "job_id": "0f8b5c1e2d3a4b5c6d7e8f9012345678",
    "seq": 3,
    "stage": "answer",
    "status": "completed",
    "ts": 1764700000.123,
    "user_id": "bench-user-0042",
    "result": {
        "category": "plastic",
        "item": "PET bottle",
        "steps": ["Empty it", "Remove the label", "Crush it", "Put it in the yellow bin"],
        "confidence": 0.93,
        "reward": {"character": "Petty", "rarity": "rare", "points": 15},
    },
    "timings": {"vision_s": 6.21, "rule_s": 0.012, "answer_s": 7.88},
}


def _loop_cpu_s(n: int) -> float:
    start = time.process_time()
    total = 0
    for i in range(n):
        total += i
    assert total == n * (n - 1) // 2
    return time.process_time() - start


def _json_cpu_s(n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        json.loads(json.dumps(_EVENT))
    return time.process_time() - start


def measure(loop_n: int = LOOP_N, json_n: int = JSON_N) -> dict[str, Any]:
    """Both loops' CPU seconds now (about 3-5 s of CPU on a 2-core Xeon)."""
    return {
        "loop_cpu_s": round(_loop_cpu_s(loop_n), 3),
        "json_cpu_s": round(_json_cpu_s(json_n), 3),
        "loop": f"for i in range({loop_n:_}): total += i",
        "json": f"json.loads(json.dumps(scan event of {len(json.dumps(_EVENT))} B)) x {json_n:_}",
        "measured_at": time.time(),
    }


@lru_cache(maxsize=1)
def once() -> dict[str, Any]:
    """`measure()` once per process: a bench command writes one report, `suite` several."""
    return measure()


def per_loop_s(ms: float | None, ref: dict[str, Any] | None) -> float | None:
    """A CPU figure in box units: ms on a box whose 20M-integer loop takes 1 s."""
    if ms is None or not ref or not ref.get("loop_cpu_s"):
        return None
    return round(ms / float(ref["loop_cpu_s"]), 2)


def normalised_cpu(cpu_per_job: dict[str, Any] | None, ref: dict[str, Any] | None) -> dict[str, Any] | None:
    """CPU per job (total and by process) in box units, or None without both."""
    if not cpu_per_job or cpu_per_job.get("total_ms") is None or not ref:
        return None
    return {
        "unit": "ms on a box whose 20M-integer loop takes 1 s",
        "total": per_loop_s(cpu_per_job["total_ms"], ref),
        "by_process": {n: per_loop_s(ms, ref) for n, ms in (cpu_per_job.get("by_process_ms") or {}).items()},
    }


def stamp(report: dict[str, Any]) -> dict[str, Any]:
    """Add the box reference (measured now unless the report has one) and CPU per job in its units."""
    ref = report.setdefault("box_ref", once())
    norm = normalised_cpu(report.get("cpu_per_job"), ref)
    if norm is not None:
        report["cpu_per_job_box"] = norm
    return report


def markdown(report: dict[str, Any]) -> list[str]:
    """The lines every report's markdown ends with."""
    ref = report.get("box_ref")
    if not ref:
        return []
    lines = [
        "## Box reference",
        "",
        f"This box ran the reference loops in {ref['loop_cpu_s']:.2f} s of CPU (`{ref['loop']}`) and "
        f"{ref['json_cpu_s']:.2f} s (`{ref['json']}`).",
    ]
    norm = report.get("cpu_per_job_box")
    if norm and norm.get("total") is not None:
        parts = ", ".join(f"{n} {v:.1f}" for n, v in norm["by_process"].items() if v and v >= 0.05)
        lines.append(
            f"CPU per completed job in box units ({norm['unit']}): **{norm['total']:.1f}** = {parts}."
        )
    return [*lines, ""]
