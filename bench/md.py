"""The markdown pieces every benchmark report shares (bench/report.py, peer.py, soak_verdict.py,
ab_report.py): numbers with units, tables, distributions, the machine line, the targets table."""

from __future__ import annotations

from typing import Any


def value(x: Any, unit: str = "", digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}{unit}"
    if isinstance(x, int):
        return f"{x:,}{unit}"
    return f"{x}{unit}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def dist(d: dict[str, Any] | None, unit: str, digits: int = 1) -> str:
    if not d or not d.get("n"):
        return "-"
    return (
        f"p50 {value(d['p50'], unit, digits)} · p95 {value(d['p95'], unit, digits)} · "
        f"p99 {value(d['p99'], unit, digits)} · max {value(d['max'], unit, digits)} (n={d['n']:,})"
    )


def machine(m: dict[str, Any]) -> str:
    return (
        f"{m.get('cores')} cores ({m.get('cpu') or 'unknown CPU'}), {m.get('memory_gib')} GiB, "
        f"Linux {m.get('kernel')}, Python {m.get('python')}, everything on one box incl. the load generator"
    )


def targets(report: dict[str, Any]) -> list[str]:
    rows = [
        [t["target"], t["goal"], value(t["measured"]), f"**{t['verdict']}**"]
        for t in report.get("targets", [])
    ]
    return ["## Targets", "", *table(["target", "goal", "measured", "verdict"], rows), ""] if rows else []
