"""Benchmark reports: <name>-<timestamp>.json (everything), .md (tables) and .png (per-second plot).

The load test's markdown puts our row beside the replaced system's published row for the same VUs,
and every report ends with its targets computed from the measured data, PASS or MISS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import md

REPORTS_DIR = Path(__file__).resolve().parent / "reports"

# The replaced system's published load results (../shared/reference/origin-system.md): 2 vCPU / 4 GB
# worker pods (1-3, KEDA), gevent pool of 100 per pod, each VU polling every ~2.5 s.
ORIGINAL: dict[int, dict[str, Any]] = {
    50: {"scans": 685, "completion": "99.7%", "throughput": 198, "e2e_p95": 17.7, "api_p95": 93},
    200: {"scans": 1649, "completion": "99.8%", "throughput": 370, "e2e_p95": 33.2, "api_p95": 83},
    250: {"scans": 1754, "completion": "99.9%", "throughput": 418, "e2e_p95": 40.5, "api_p95": 78},
    300: {"scans": 1732, "completion": "99.9%", "throughput": 404, "e2e_p95": 48.6, "api_p95": 83},
}


def write(report: dict[str, Any], out_dir: Path | None = None) -> dict[str, Path]:
    """Write the three files; returns their paths by extension. Every report gets the box
    reference first (bench/boxref.py)."""
    from . import boxref

    boxref.stamp(report)
    out_dir = out_dir or REPORTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(report.get("started_at", time.time())))
    base = out_dir / f"{report['name']}-{stamp}"
    paths = {
        "json": base.with_suffix(".json"),
        "md": base.with_suffix(".md"),
        "png": base.with_suffix(".png"),
    }
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


# --- markdown ------------------------------------------------------------------------------------


def _services(report: dict[str, Any]) -> list[str]:
    svc = report.get("services_cpu") or {}
    if not svc:
        return []
    rows = [
        [
            n,
            md.value(v["cpu_s"], " s", 1),
            md.value(v["avg_pct_of_core"], "%"),
            md.value(v["rss_mib"], " MiB"),
        ]
        for n, v in sorted(svc.items(), key=lambda kv: -kv[1]["cpu_s"])
    ]
    return [
        "## CPU by process during the run",
        "",
        *md.table(["process", "CPU", "avg (100% = 1 core)", "RSS at end"], rows),
        "",
    ]


def cpu_headline(report: dict[str, Any]) -> list[str]:
    """The run's CPU per completed job, total and per process: the first thing a report shows."""
    cpu = report.get("cpu_per_job") or {}
    if cpu.get("total_ms") is None:
        return []
    parts = ", ".join(f"{n} {md.value(ms, ' ms', 1)}" for n, ms in cpu["by_process_ms"].items() if ms >= 0.05)
    return [
        f"**CPU per completed job: {md.value(cpu['total_ms'], ' ms', 1)}** (all stack processes, "
        f"{cpu['jobs']:,} jobs) = {parts}.",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    kind = report.get("kind")
    if kind == "soak":
        from .soak_verdict import markdown as soak_md

        body = soak_md(report)
    elif kind == "peer":
        from .peer import markdown as peer_md

        body = peer_md(report)
    elif kind == "ab":
        from .ab_report import markdown as ab_md

        body = ab_md(report)
    elif kind == "alerts":
        from .alerts import markdown as alerts_md

        body = alerts_md(report)
    elif kind == "abuse":
        from .abuse import markdown as abuse_md

        body = abuse_md(report)
    else:
        body = _load_md(report) if kind == "load" else _micro_md(report)
    from .boxref import markdown as boxref_md

    return "\n".join([*body, *boxref_md(report)]) + "\n"


def _load_md(report: dict[str, Any]) -> list[str]:
    c, r = report["config"], report["results"]
    lat = c["model_latency"]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(report["started_at"]))
    lines = [
        f"# Load test `{report['name']}` ({when})",
        "",
        f"- Scenario: {c['vus']} VUs, ramp 0 -> {c['vus']} in {c['ramp_up_s']:g} s, hold {c['hold_s']:g} s, "
        f"ramp down {c['ramp_down_s']:g} s; each VU loops POST scan -> "
        + (
            f"poll the result every {c['poll_interval_s']:g} s"
            if c["mode"] == "polling"
            else "follow the job's SSE stream"
        )
        + " until final -> repeat.",
        f"- Simulated model latency: {lat['min_s']:g}-{lat['max_s']:g} s per call (2 calls per scan).",
        f"- Machine: {md.machine(report['machine'])}.",
        "",
        *cpu_headline(report),
    ]
    if report.get("stage_concurrency"):
        lines.append(
            f"- Stage workers: one process, {report['stage_concurrency']} jobs in flight per stage "
            "(`ECO2_STAGE_CONCURRENCY`)."
        )
    lag = r.get("generator_loop_lag_ms") or {}
    lines += [
        f"- Load generator CPU: {md.value(r['generator_cpu'].get('cpu_s'), ' s')} "
        f"(avg {md.value(r['generator_cpu'].get('avg_pct_of_core'), '%')} of one core); "
        f"its event loop woke up late by p99 {md.value(lag.get('p99'), ' ms')}, "
        f"max {md.value(lag.get('max'), ' ms')} (latencies it measured may be "
        "inflated by up to that much).",
        "",
        "## Beside the original",
        "",
    ]
    vus = c["vus"]
    rows = [
        [
            f"{vus} (ours, {c['mode']})",
            md.value(r["scans_attempted"]),
            md.pct(r["completion_rate"]),
            f"{md.value(r['throughput_jpm'], '', 0)} jobs/min",
            md.value(r["e2e_s"]["p95"], " s"),
            md.value(r["scan_api_ms"]["p95"], " ms"),
        ]
    ]
    o = ORIGINAL.get(vus)
    if o:
        rows.append(
            [
                f"{vus} (original)",
                f"{o['scans']:,}",
                o["completion"],
                f"{o['throughput']} jobs/min",
                f"{o['e2e_p95']} s",
                f"{o['api_p95']} ms",
            ]
        )
    lines += md.table(["VUs", "scans", "completion", "throughput", "E2E p95", "Scan API p95"], rows)
    lines += ["", "## Results", ""]
    res = [
        [
            "scan success (POST accepted)",
            f"{md.pct(r['scan_success_rate'])} ({r['scans_accepted']:,} / {r['scans_attempted']:,})",
        ],
        [
            "completion (completed / submitted)",
            f"{md.pct(r['completion_rate'])} ({r['jobs_completed']:,} / "
            f"{r['jobs_submitted']:,}; failed {r['jobs_failed']})",
        ],
        ["jobs by outcome", ", ".join(f"{k} {v:,}" for k, v in sorted(r["jobs_by_status"].items()))],
        ["reward rate", md.pct(r["reward_rate"])],
        ["Scan API (POST) latency", md.dist(r["scan_api_ms"], " ms")],
        ["result API (GET) latency", md.dist(r["result_api_ms"], " ms")],
        ["completion time (submit -> terminal)", md.dist(r["completion_time_s"], " s", 2)],
        ["E2E (VU iteration)", md.dist(r["e2e_s"], " s", 2)],
        ["model time per job (vision + answer)", md.dist(r["model_time_s"], " s", 2)],
        ["throughput, whole run", f"{md.value(r['throughput_jpm'], '', 0)} jobs/min over {r['run_s']} s"],
        [
            "throughput, steady state",
            f"{md.value(r['throughput_steady_jpm'], '', 0)} jobs/min (hold from "
            f"{r['steady_window_s'][0]} s to {r['steady_window_s'][1]} s)",
        ],
    ]
    if r.get("polls_per_job"):
        p = r["polls_per_job"]
        res.append(
            [
                "polls per job",
                f"mean {md.value(p['mean'], '', 1)} · p95 {md.value(p['p95'])} · "
                f"max {md.value(p['max'], '', 0)}",
            ]
        )
    if r.get("sse"):
        sse = r["sse"]
        res += [
            [
                "SSE events received",
                f"{sse['events_received']:,} ({md.value(sse['events_per_s'])}/s avg, "
                f"peak {sse['events_per_s_peak']:,}/s)",
            ],
            ["SSE delivery latency (event ts -> client)", md.dist(sse["delivery_ms"], " ms")],
            [
                "SSE lost / duplicated / unexpected events",
                f"{sse['lost']} / {sse['duplicated']} / {sse['unexpected']} "
                f"over {sse['jobs_checked']:,} jobs",
            ],
            ["SSE out-of-order jobs / reconnects", f"{sse['out_of_order_jobs']} / {sse['reconnects']}"],
        ]
    if r.get("errors"):
        res.append(["errors (top)", "; ".join(f"{k} x{v}" for k, v in r["errors"].items())])
    lines += md.table(["metric", "value"], res)
    st = r.get("stages") or {}
    if st:
        lines += [
            "",
            "## Per stage",
            "",
            "From the events in Redis history: wait = started - previous completed (queue and hand-over), "
            "service = completed - started; timings = the stage's own measurement in the result.",
            "",
        ]
        rows = []
        for name, d in st["from_events"].items():
            t = st["from_timings"].get(name, {})
            rows.append(
                [
                    name,
                    md.value(d["wait_s"]["p50"], " s", 3),
                    md.value(d["wait_s"]["p95"], " s", 3),
                    md.value(d["service_s"]["p50"], " s", 3),
                    md.value(d["service_s"]["p95"], " s", 3),
                    md.value(t.get("p95"), " s", 3),
                ]
            )
        d = st["done_after_reward_s"]
        rows.append(
            ["done (after reward)", "-", "-", md.value(d["p50"], " s", 3), md.value(d["p95"], " s", 3), "-"]
        )
        lines += md.table(
            ["stage", "wait p50", "wait p95", "service p50", "service p95", "timings p95"], rows
        )
        lines += [
            "",
            f"History check: {st['history_mismatched_jobs']} of {st['history_checked_jobs']:,} finished "
            "jobs have a seq list in Redis that is not the expected one.",
        ]
    lines += [""]
    lines += md.targets(report)
    lines += _services(report)
    return lines


def _flat(prefix: str, value: Any, rows: list[list[str]]) -> None:
    if isinstance(value, dict) and set(value) >= {"n", "p50", "p95"}:
        rows.append([prefix, md.dist(value, "", 3)])
    elif isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, rows)
    elif not isinstance(value, list):
        rows.append([prefix, md.value(value, "", 2)])


def _micro_md(report: dict[str, Any]) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(report["started_at"]))
    lines = [f"# {report.get('title', report['name'])} ({when})", "", *cpu_headline(report)]
    if report.get("description"):
        lines += [report["description"], ""]
    lines += [
        f"- Machine: {md.machine(report['machine'])}.",
        "- Config: " + ", ".join(f"{k}={v}" for k, v in report.get("config", {}).items()) + ".",
        "",
    ]
    rows: list[list[str]] = []
    _flat("", report["results"], rows)
    lines += ["## Results", "", *md.table(["metric", "value"], rows), ""]
    lines += md.targets(report)
    lines += _services(report)
    return lines


# --- plot ----------------------------------------------------------------------------------------

# Panels per report kind: each a list of (series column, label); a column prefixed "right:" goes on
# a second y axis.
PANELS: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {
    "load": [
        ("VUs", [("vus", "VUs"), ("in_flight", "jobs in flight")]),
        ("jobs/min", [("throughput_jpm", "throughput (10 s window)")]),
        (
            "E2E p95 (s)",
            [("e2e_p95_s", "E2E p95 (s, 10 s window)"), ("right:post_p95_ms", "Scan API p95 (ms)")],
        ),
        (
            "CPU % of a core",
            [("gen_cpu_pct", "load generator"), ("machine_cpu_pct", "whole box (all cores)")],
        ),
    ],
}


PANELS["chaos"] = PANELS["load"]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.get("kind") == "peer":
        from .peer import plot as peer_plot

        return peer_plot(report, path)
    if report.get("kind") == "ab":
        from .ab_report import plot as ab_plot

        return ab_plot(report, path)
    if report.get("kind") == "abuse":
        from .abuse import plot as abuse_plot

        return abuse_plot(report, path)
    series: list[dict[str, Any]] = report.get("series") or []
    panels = PANELS.get(report.get("kind", ""), report.get("panels") or [])
    if not series or not panels:
        fig, ax = plt.subplots(figsize=(8, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{report['name']}: no time series", ha="center", va="center")
    else:
        fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.4 * len(panels)), sharex=True, squeeze=False)
        t = [row["t"] for row in series]
        for ax, (ylabel, cols) in zip(axes[:, 0], panels, strict=True):
            right = None
            for col, label in cols:
                ys = [
                    float("nan")
                    if row.get(col.removeprefix("right:")) is None
                    else row[col.removeprefix("right:")]
                    for row in series
                ]
                if col.startswith("right:"):
                    right = right or ax.twinx()
                    right.plot(t, ys, label=label, linestyle="--", color="C3")
                    right.set_ylabel(label)
                else:
                    ax.plot(t, ys, label=label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            if right is not None:
                h2, l2 = right.get_legend_handles_labels()
                handles, labels = handles + h2, labels + l2
            ax.legend(handles, labels, loc="upper left", fontsize=8)
        axes[-1, 0].set_xlabel("seconds since start")
        fig.suptitle(report["name"])
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the results section of docs/benchmarks.md -----------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
STANDARD_VUS = (50, 200, 300, 1000)  # the VU counts docs/benchmarks.md reports
START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def load_reports(out_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every JSON report in the directory, oldest first (with its file name as `_file`)."""
    out = []
    for f in sorted((out_dir or REPORTS_DIR).glob("*.json")):
        try:
            rep = json.loads(f.read_text())
        except ValueError:
            continue
        if isinstance(rep, dict) and "kind" in rep:
            rep["_file"] = f.name
            out.append(rep)
    return sorted(out, key=lambda r: r.get("started_at", 0))


def _latest(reports: list[dict[str, Any]], key: Any) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for rep in reports:  # oldest first: later ones win
        out[key(rep)] = rep
    return out


def _verdict(rep: dict[str, Any], prefix: str) -> str:
    for t in rep.get("targets", []):
        if t["target"].startswith(prefix):
            return f"{t['verdict']} ({md.value(t['measured'])})"
    return "-"


def results_section(reports: list[dict[str, Any]]) -> str:
    """Our latest numbers beside the original's, the targets, and the micro-benchmarks (markdown)."""
    loads = _latest(
        [r for r in reports if r.get("kind") == "load"],
        lambda r: (r["config"]["vus"], r["config"]["mode"]),
    )
    lines: list[str] = []
    rows = []
    for vus in sorted({*ORIGINAL, *STANDARD_VUS, *(v for v, _ in loads)}):
        o = ORIGINAL.get(vus)
        if o is None and vus in STANDARD_VUS:
            rows.append([f"{vus:,}", "original", "not published", "-", "-", "-", "-", "-", "-"])
        if o:
            rows.append(
                [
                    f"{vus:,}",
                    "original (polling)",
                    f"{o['scans']:,}",
                    o["completion"],
                    f"{o['throughput']}",
                    "-",
                    f"{o['e2e_p95']} s",
                    f"{o['api_p95']} ms",
                    "-",
                ]
            )
        for mode in ("polling", "sse"):
            rep = loads.get((vus, mode))
            if rep is None:
                if vus in STANDARD_VUS and mode == "polling":
                    rows.append([f"{vus:,}", "**ours**", "not yet run (`eco2 bench suite`)", *["-"] * 6])
                continue
            r = rep["results"]
            rows.append(
                [
                    f"{vus:,}",
                    f"**ours ({mode})**",
                    md.value(r["scans_attempted"]),
                    md.pct(r["completion_rate"]),
                    md.value(r["throughput_jpm"], "", 0),
                    md.value(r.get("throughput_steady_jpm"), "", 0),
                    md.value(r["e2e_s"]["p95"], " s"),
                    md.value(r["scan_api_ms"]["p95"], " ms"),
                    f"`{rep['_file']}`",
                ]
            )
    lines += ["### Load test: the original's scenario", ""]
    lines += md.table(
        [
            "VUs",
            "system",
            "scans",
            "completion",
            "throughput (jobs/min)",
            "steady (jobs/min)",
            "E2E p95",
            "Scan API p95",
            "report",
        ],
        rows,
    )
    trows = []
    for (vus, mode), rep in sorted(loads.items()):
        trows.append(
            [
                f"{vus:,} {mode}",
                _verdict(rep, "completion"),
                _verdict(rep, "throughput"),
                _verdict(rep, "E2E"),
                _verdict(rep, "Scan API"),
                _verdict(rep, "SSE"),
                _verdict(rep, "CPU per"),
            ]
        )
    if trows:
        lines += ["", "### Targets per run", ""]
        lines += md.table(
            [
                "run",
                "completion >= 99.9%",
                "throughput >= 95% of VUs/model time",
                "E2E p95 <= 1.10 x model p95",
                "Scan API p95 <= 20 ms",
                "SSE lost/dup = 0",
                "CPU per job <= 30 ms",
            ],
            trows,
        )
    micro = _latest(
        [r for r in reports if r.get("kind") in ("router", "fanout", "pipeline")],
        lambda r: (r["kind"], r["name"]),
    )
    mrows = []
    for (kind, _), rep in sorted(micro.items()):
        if kind != "pipeline":
            continue
        r = rep["results"]
        pg = r.get("postgres_stored") or {}
        mrows.append(
            [
                "pipeline, zero-latency model",
                f"{r['submitted']:,} jobs: terminal in Redis at "
                f"{md.value(r['redis_terminal']['jobs_per_s'])} jobs/s, stored in Postgres at "
                f"{md.value(pg.get('jobs_per_s'))} jobs/s; "
                f"Scan API p95 {md.value(r['scan_api_ms']['p95'], ' ms')}; "
                f"CPU {md.value((rep.get('cpu_per_job') or {}).get('total_ms'), ' ms')} per job",
                "-",
                f"`{rep['_file']}`",
            ]
        )
    for (kind, _), rep in sorted(micro.items()):
        if kind != "router":
            continue
        r = rep["results"]
        lag = r.get("lag_drain") or {}
        mrows.append(
            [
                "router (private router draining a backlog)",
                f"{md.value(lag.get('events_per_s'), '', 0)} events/s ({md.value(lag.get('events'))} events, "
                f"{md.value(lag.get('events_per_cpu_s'), '', 0)} events per CPU second)",
                _verdict(rep, "router events/s (lag"),
                f"`{rep['_file']}`",
            ]
        )
        mrows.append(
            [
                "router logic direct (StateStore.apply)",
                f"{md.value(r['direct']['events_per_s'], '', 0)} events/s",
                _verdict(rep, "router events/s (direct"),
                f"`{rep['_file']}`",
            ]
        )
    for (kind, _), rep in sorted(micro.items()):
        if kind != "fanout":
            continue
        r = rep["results"]
        d = r["delivery_ms"]
        churn = (r.get("streams_per_client") or 1) > 1
        server = r.get("server", "gateway")
        who = f"one {server}" if r.get("processes", 1) == 1 else f"{r['processes']} {server} processes"
        mrows.append(
            [
                f"SSE fan-out, {who}, {r['clients']:,} clients"
                + (
                    f", streams ending ({r['streams_per_s']:,} opened/s, "
                    f"{md.value(r['gateway_cpu_ms_per_stream'], ' ms', 2)} gateway CPU per stream, "
                    f"max delivery gap {md.value(r['max_delivery_gap_ms'], ' ms')})"
                    if churn
                    else ""
                ),
                f"{r['connected']:,} streaming; delivery p50 {md.value(d['p50'], ' ms')}, "
                f"p99 {md.value(d['p99'], ' ms')} at {md.value(r['apply_rate_achieved'], '', 0)} events/s; "
                f"{md.value(r['gateway_kib_per_connection'])} KiB "
                "per connection; "
                + (f"{peak} Redis connections; " if (peak := r["gateway_redis_connections"]["peak"]) else "")
                + f"lost/dup {r['lost']}/{r['duplicated']}",
                " · ".join(_verdict(rep, p) for p in ("no stall" if churn else "10,000", "delivery p99")),
                f"`{rep['_file']}`",
            ]
        )
    if mrows:
        lines += ["", "### Micro-benchmarks", ""]
        lines += md.table(["benchmark", "result", "target", "report"], mrows)
    return "\n".join(_measured_on([*loads.values(), *micro.values()]) + lines) + "\n"


def _measured_on(used: list[dict[str, Any]]) -> list[str]:
    """The boxes the rows ran on, with the days of their reports (rows keep their newest run)."""
    days: dict[str, set[str]] = {}
    for rep in used:
        when = time.strftime("%Y-%m-%d", time.localtime(rep.get("started_at", 0)))
        days.setdefault(md.machine(rep["machine"]), set()).add(when)
    if not days:
        return []
    boxes = "; ".join(
        f"{box} ({', '.join(sorted(d))})" for box, d in sorted(days.items(), key=lambda kv: max(kv[1]))
    )
    return [f"Measured on: {boxes}.", ""]


def write_docs(section: str, path: Path = DOCS) -> bool:
    """Replace the generated results block of docs/benchmarks.md; False when it has no markers."""
    text = path.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{section}{END}{tail}")
    return True
