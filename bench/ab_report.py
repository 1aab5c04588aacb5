"""`eco2 bench ab`'s arithmetic and report: each run's figures, both sides' spread, their ratio.

A figure is any number a run's report holds under `results`, `cpu_per_job` or `services_cpu`
(dotted path, e.g. `results.e2e_s.p95`), plus the box reference measured before the run and CPU
per job in its units (`cpu_per_job_box.total`). Side A is the base ref, B the working tree; the
ratio is B's median over A's, so < 1 means B is smaller (less CPU, lower latency, or fewer jobs/s).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import boxref, md

SIDES = ("A", "B")
# The report sections whose numbers are figures (others are config, time series, environment).
SECTIONS = ("results", "cpu_per_job", "services_cpu")
# Shown first in the markdown when a run has them (load, SSE, pipeline, router and fan-out figures).
HEADLINE = (
    "cpu_per_job.total_ms",
    "cpu_per_job_box.total",
    "results.completion_rate",
    "results.throughput_steady_jpm",
    "results.e2e_s.p95",
    "results.scan_api_ms.p95",
    "results.sse.delivery_ms.p50",
    "results.sse.delivery_ms.p99",
    "results.sse.lost",
    "results.sse.duplicated",
    "results.redis_terminal.jobs_per_s",
    "results.postgres_stored.jobs_per_s",
    "results.direct.events_per_s",
    "results.lag_drain.events_per_s",
    "results.delivery_ms.p99",
    "box.loop_cpu_s",
    "box.json_cpu_s",
)


def order(runs: int) -> list[tuple[str, int]]:
    """Which side runs when: A B A B ..., `runs` of each, so drift in the box's load hits both."""
    return [(side, i) for i in range(1, runs + 1) for side in SIDES]


def flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """Every int or float leaf of nested dicts by dotted path (bools, strings, lists skipped)."""
    out: dict[str, float] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


def figures(report: Mapping[str, Any], box: Mapping[str, Any] | None) -> dict[str, float]:
    """One run's figures: its report's numbers, the box reference, CPU per job in box units."""
    out: dict[str, float] = {}
    for section in SECTIONS:
        if section in report:
            out.update(flatten(report[section], section))
    if box:
        out["box.loop_cpu_s"] = float(box["loop_cpu_s"])
        out["box.json_cpu_s"] = float(box["json_cpu_s"])
        norm = boxref.normalised_cpu(report.get("cpu_per_job"), dict(box))
        if norm is not None:
            out.update(flatten({"total": norm["total"], "by_process": norm["by_process"]}, "cpu_per_job_box"))
    return out


def spread(values: Iterable[float]) -> dict[str, float] | None:
    vals = sorted(values)
    if not vals:
        return None
    return {"n": len(vals), "min": vals[0], "median": statistics.median(vals), "max": vals[-1]}


def _ratio(b: float | None, a: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return round(b / a, 4)


def compare(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per figure: A's and B's min/median/max over their runs, B/A of the medians, and the spread
    of B_i/A_i over the pairs (run i of each side, which ran back to back)."""
    by: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        for name, v in (run.get("figures") or {}).items():
            by.setdefault(name, {s: {} for s in SIDES})[run["side"]][run["index"]] = v
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(by):
        a, b = by[name]["A"], by[name]["B"]
        sa, sb = spread(a.values()), spread(b.values())
        pairs = [r for i in sorted(a.keys() & b.keys()) if (r := _ratio(b[i], a[i])) is not None]
        out[name] = {
            "A": sa,
            "B": sb,
            "ratio": _ratio(sb["median"] if sb else None, sa["median"] if sa else None),
            "pair_ratios": spread(pairs),
        }
    return out


def build(
    config: Mapping[str, Any],
    runs: list[dict[str, Any]],
    started_at: float,
    machine: Mapping[str, Any],
    box_ref: Mapping[str, Any],
) -> dict[str, Any]:
    """The ab report (kind "ab"), written by bench.report.write like every other."""
    compared = compare(runs)
    first = next((r for r in runs if r.get("report_name")), None)
    return {
        "kind": "ab",
        "name": config.get("name") or f"ab-{first['report_name'] if first else 'bench'}",
        "title": f"A/B: {' '.join(config['bench_args'])}",
        "started_at": started_at,
        "config": dict(config),
        "machine": dict(machine),
        "box_ref": dict(box_ref),
        "runs": runs,
        "figures": compared,
        "headline": [f for f in HEADLINE if f in compared],
        "targets": [],
    }


# --- markdown and plot -----------------------------------------------------------------------


def _n(x: float | None) -> str:
    if x is None:
        return "-"
    if x == int(x) and abs(x) >= 100:
        return f"{int(x):,}"
    return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.1f}"


def _side(s: Mapping[str, float] | None) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return _n(s["median"])
    return f"{_n(s['median'])} ({_n(s['min'])}..{_n(s['max'])})"


def _row(name: str, f: Mapping[str, Any]) -> str:
    pr = f.get("pair_ratios")
    pairs = "-" if not pr else (f"{pr['min']:.3f}..{pr['max']:.3f}" if pr["n"] > 1 else f"{pr['min']:.3f}")
    ratio = "-" if f.get("ratio") is None else f"**{f['ratio']:.3f}**"
    return f"| `{name}` | {_side(f.get('A'))} | {_side(f.get('B'))} | {ratio} | {pairs} |"


def markdown(report: Mapping[str, Any]) -> list[str]:
    c = report["config"]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(report["started_at"]))

    head = [
        "| figure | A: median (min..max) | B: median (min..max) | B/A | B_i/A_i |",
        "|---|---:|---:|---:|---:|",
    ]
    lines = [
        f"# {report['title']} ({when})",
        "",
        f"- A = `{c['base_ref']}` ({c['base_sha'][:12]}), B = the working tree at {c['head_sha'][:12]}"
        + (" with uncommitted changes" if c.get("dirty") else "")
        + f"; {c['runs']} run(s) each, in the order {' '.join(f'{s}{i}' for s, i in c['order'])}.",
        "- Each run on its own fresh stack, brought up from that side's checkout "
        "(`eco2 stack up`, "
        + (
            f"an untimed warm-up `eco2 bench pipeline --jobs {c['warmup_jobs']}`, "
            if c.get("warmup_jobs")
            else ""
        )
        + f"then `eco2 {' '.join(c['bench_args'])}`, then `eco2 stack down --reset`); "
        f"A's Python environment: {c['base_env']}.",
        f"- Machine: {md.machine(report['machine'])}.",
        "- B/A is B's median over A's; B_i/A_i the range of the ratio over runs that ran back to back. "
        "`box.*` is the box reference measured just before each run; `cpu_per_job_box.*` is CPU per job "
        "in its units (ms on a box whose 20M-integer loop takes 1 s).",
        "",
    ]
    failed = [r for r in report["runs"] if r.get("error")]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- {r['side']}{r['index']}: {r['error']}" for r in failed]
        lines += [""]
    figs = report["figures"]
    if report["headline"]:
        lines += ["## Headline figures", "", *head]
        lines += [_row(n, figs[n]) for n in report["headline"]]
        lines += [""]
    lines += ["## Runs", "", "| run | ref | report | box loop | seconds |", "|---|---|---|---:|---:|"]
    for r in report["runs"]:
        lines.append(
            f"| {r['side']}{r['index']} | {r['ref'][:12]} | `{r.get('report_file') or '-'}` | "
            f"{_n((r.get('box_ref') or {}).get('loop_cpu_s'))} s | {_n(r.get('seconds'))} |"
        )
    lines += ["", "## Every figure", "", *head, *(_row(n, f) for n, f in figs.items()), ""]
    return lines


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Each headline figure's runs, A and B, in run order (cheap: the lock has matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["headline"] or list(report["figures"])[:6]
    fig, axes = plt.subplots(max(len(names), 1), 1, figsize=(8, 1.8 * max(len(names), 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=False):
        for side, colour in zip(SIDES, ("C0", "C3"), strict=True):
            pts = [
                (r["index"], r["figures"][name])
                for r in report["runs"]
                if r["side"] == side and name in (r.get("figures") or {})
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colour, label=side)
        ratio = report["figures"][name].get("ratio")
        ax.set_title(f"{name}   B/A {ratio:.3f}" if ratio is not None else name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("run")
    fig.suptitle(report["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
