"""The SSE fan-out benchmark beside a peer: the gateway and Centrifugo on the same run.

`eco2 bench peer` runs `bench.micro_fanout` twice per event rate (default 1,000 and 6,667 events/s,
10,000 clients): once against the project's gateway (`--gateways` processes on one port, on their
private Redis) and once against Centrifugo v6 (https://centrifugal.dev), a Go real-time server,
configured for the same job: unidirectional SSE (`uni_sse`), one channel per job that the client's
connection JWT subscribes it to (`channels` claim), channel history on (10 events, 300 s: as the
gateway's Redis history), the in-memory engine, and the same events published through its server
HTTP API (`/api/batch`, one batch per 50 ms tick, as the gateway's benchmark applies one Redis
pipeline per tick). Delivery latency, lost/duplicated events, memory per connection and CPU per
1,000 events are compared side by side (the gateway's CPU includes its Redis: Centrifugo holds
history and pub/sub in its own process).

Centrifugo is not part of the project or of `make test`: `eco2 bench peer --build` installs it with
`go install github.com/centrifugal/centrifugo/v6@v6.9.1` into `.local/bin` (about 2 minutes from
the Go module proxy); without Go the peer run is skipped with a message saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jwt

from contract.events import ScanEvent, ScanJob
from contract.settings import Settings

from . import harness, md, synthetic, wire
from .micro_fanout import Fanout, FanoutConfig, Server, fanout, gateway_server
from .stats import machine

CENTRIFUGO_MODULE = "github.com/centrifugal/centrifugo/v6"
CENTRIFUGO_VERSION = "v6.9.1"
RATES = (1000.0, 6667.0)
# Issue 23's targets: the gateway's delivery p99 within 2x of Centrifugo's, its CPU per event within 1.5x.
TARGET_RATIOS = {"delivery p99": 2.0, "CPU per event": 1.5}


class PeerMissing(harness.BenchError):
    """Centrifugo is not installed (and cannot be built here)."""


def centrifugo_binary(s: Settings) -> Path | None:
    """`ECO2_CENTRIFUGO_BIN`, `.local/bin/centrifugo`, then the PATH."""
    for cand in (os.environ.get("ECO2_CENTRIFUGO_BIN"), str(s.local_dir / "bin" / "centrifugo")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    found = shutil.which("centrifugo")
    return Path(found) if found else None


def missing_peer_message() -> str:
    hint = (
        "run `eco2 bench peer --build`"
        if shutil.which("go")
        else "Go is not installed, so it cannot be built"
    )
    return f"skipped: Centrifugo not found ({hint})"


def build_centrifugo(s: Settings, say: Any = print) -> Path:
    """`go install` the pinned Centrifugo into `.local/bin` (Go's module proxy; ~2 minutes)."""
    go = shutil.which("go")
    if go is None:
        raise PeerMissing("skipped: Go is not installed, so Centrifugo cannot be built here")
    target = s.local_dir / "bin"
    target.mkdir(parents=True, exist_ok=True)
    say(f"peer: go install {CENTRIFUGO_MODULE}@{CENTRIFUGO_VERSION} into {target} (about 2 minutes)")
    out = subprocess.run(
        [go, "install", f"{CENTRIFUGO_MODULE}@{CENTRIFUGO_VERSION}"],
        env={**os.environ, "GOBIN": str(target)},
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise PeerMissing(f"go install of Centrifugo failed:\n{out.stderr[-2000:]}")
    return target / "centrifugo"


def centrifugo_config(port: int, secret: str, api_key: str) -> dict[str, Any]:
    return {
        "http_server": {"address": "127.0.0.1", "port": port},
        "log": {"level": "error"},
        "client": {"token": {"hmac_secret_key": secret}, "allowed_origins": ["*"]},
        "uni_sse": {"enabled": True},
        "http_api": {"key": api_key},
        "channel": {"without_namespace": {"history_size": 10, "history_ttl": "300s"}},
        "health": {"enabled": True},
        "usage_stats": {"disabled": True},
    }


@contextlib.asynccontextmanager
async def centrifugo_server(s: Settings, cfg: FanoutConfig, run: str) -> AsyncIterator[Server]:
    binary = centrifugo_binary(s)
    if binary is None:
        raise PeerMissing(missing_peer_message())
    port = harness.free_port()
    secret, api_key = os.urandom(16).hex(), os.urandom(16).hex()
    d = Path(tempfile.mkdtemp(prefix="eco2-centrifugo-"))
    conf = d / "config.json"
    conf.write_text(json.dumps(centrifugo_config(port, secret, api_key)))
    log = s.local_dir / "logs" / "bench" / f"centrifugo-{run}.log"
    proc = harness.Proc(f"centrifugo-{run}", [str(binary), "--config", str(conf)], {}, log).start()
    api = wire.Connection("127.0.0.1", port)
    headers = {"X-API-Key": api_key, "Content-Type": "application/json"}
    try:
        await harness.wait_http(f"http://127.0.0.1:{port}/health", proc)

        async def prepare(evs: list[list[ScanEvent]]) -> None:
            return None  # its clients read no history on connect (uni_sse has no Last-Event-ID)

        async def publish(batch: list[ScanEvent]) -> None:
            commands = [{"publish": {"channel": e.job_id, "data": e.model_dump(mode="json")}} for e in batch]
            body = json.dumps({"commands": commands}).encode()
            resp = await api.request("POST", "/api/batch", headers, body)
            if resp.status != 200:
                raise harness.BenchError(f"Centrifugo /api/batch: HTTP {resp.status} {resp.body[:200]!r}")
            errors = [r["error"] for r in resp.json().get("replies", []) if r.get("error")]
            if errors:
                raise harness.BenchError(f"Centrifugo refused a publish: {errors[0]}")

        async def follow(j: ScanJob, fan: Fanout) -> wire.Follow:
            token = jwt.encode({"sub": j.user_id, "channels": [j.job_id]}, secret, algorithm="HS256")
            return await wire.follow_centrifugo(
                "127.0.0.1",
                port,
                token,
                timeout_s=cfg.timeout_s,
                on_event=fan.on_event,
                on_connect=fan.connected,
            )

        yield Server(
            name="centrifugo",
            pids=[proc.pid],
            prepare=prepare,
            publish=publish,
            follow=follow,
            history_on_connect=False,
        )
    finally:
        api.close()
        proc.stop()
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class PeerConfig:
    clients: int = 10_000
    rates: tuple[float, ...] = RATES
    gateways: int = 1
    streams: int = 1  # > 1: streams that end (see FanoutConfig.streams)
    connect_rate: float = 500.0
    timeout_s: float = 300.0
    name: str = ""


async def run_peer(
    s: Settings, cfg: PeerConfig, save: Callable[[dict[str, Any]], str], say: Any = print
) -> dict[str, Any]:
    """Both servers at every rate, one after the other; `save` writes each run's own report and
    returns its file name (bench.report.write: that module renders this one's report kind)."""
    if centrifugo_binary(s) is None:  # fail before the gateway's runs, not after them
        raise PeerMissing(missing_peer_message())
    started = time.time()
    rows: list[dict[str, Any]] = []
    files: list[str] = []
    for rate in cfg.rates:
        for server_cm, label in ((gateway_server, "gateway"), (centrifugo_server, "centrifugo")):
            run = synthetic.run_id()
            fcfg = FanoutConfig(
                clients=cfg.clients,
                rate=rate,
                connect_rate=cfg.connect_rate,
                timeout_s=cfg.timeout_s,
                gateways=cfg.gateways,
                streams=cfg.streams,
                name=f"peer-{label}-{cfg.clients}-{int(rate)}eps"
                + (f"-churn{cfg.streams}" if cfg.streams > 1 else ""),
            )
            say(f"peer: {label} at {rate:,.0f} events/s")
            async with server_cm(s, fcfg, run) as server:
                one = await fanout(server, fcfg, run, say)
            files.append(save(one))
            rows.append(_row(label, rate, one))
            await asyncio.sleep(2.0)  # let sockets close before the next server starts
    return _report(cfg, started, rows, files)


def _row(label: str, rate: float, one: dict[str, Any]) -> dict[str, Any]:
    r = one["results"]
    return {
        "server": label,
        "processes": r["processes"],
        "rate": rate,
        "achieved": r["apply_rate_achieved"],
        "streaming": r["connected"],
        "finished": r["finished"],
        "p50_ms": r["delivery_ms"]["p50"],
        "p99_ms": r["delivery_ms"]["p99"],
        "lost": r["lost"],
        "duplicated": r["duplicated"],
        "kib_per_connection": r["gateway_kib_per_connection"],
        "cpu_pct": r["server_cpu_pct_while_publishing"],
        "cpu_ms_per_1000_events": r["server_cpu_ms_per_1000_events"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def _report(cfg: PeerConfig, started: float, rows: list[dict[str, Any]], files: list[str]) -> dict[str, Any]:
    targets: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    for rate in cfg.rates:
        ours = next(r for r in rows if r["rate"] == rate and r["server"] == "gateway")
        peer = next(r for r in rows if r["rate"] == rate and r["server"] == "centrifugo")
        p99 = _ratio(ours["p99_ms"], peer["p99_ms"])
        cpu = _ratio(ours["cpu_ms_per_1000_events"], peer["cpu_ms_per_1000_events"])
        ratios.append({"rate": rate, "p99_ratio": p99, "cpu_ratio": cpu})
        for what, ratio in (("delivery p99", p99), ("CPU per event", cpu)):
            goal = TARGET_RATIOS[what]
            targets.append(
                {
                    "target": f"{what} vs Centrifugo at {rate:,.0f} events/s",
                    "goal": f"<= {goal:g}x",
                    "measured": None if ratio is None else f"{ratio:g}x",
                    "verdict": "n/a" if ratio is None else ("PASS" if ratio <= goal else "MISS"),
                }
            )
        if rate >= 6000:
            p = ours["p99_ms"]
            targets.append(
                {
                    "target": f"gateway delivery p99 at {rate:,.0f} events/s",
                    "goal": "<= 100 ms",
                    "measured": None if p is None else f"{p:.1f} ms",
                    "verdict": "n/a" if p is None else ("PASS" if p <= 100 else "MISS"),
                }
            )
    bad = sum(r["lost"] + r["duplicated"] for r in rows)
    targets.append(
        {
            "target": "lost/duplicated events (both)",
            "goal": "0",
            "measured": bad,
            "verdict": "PASS" if bad == 0 else "MISS",
        }
    )
    return {
        "kind": "peer",
        "name": cfg.name or f"peer-centrifugo-{cfg.clients}",
        "title": f"SSE fan-out beside Centrifugo {CENTRIFUGO_VERSION}: {cfg.clients:,} clients",
        "description": __doc__,
        "started_at": started,
        "config": {**asdict(cfg), "centrifugo": CENTRIFUGO_VERSION},
        "machine": machine(),
        "results": {"rows": rows, "ratios": ratios, "reports": files},
        "targets": targets,
        "series": [],
    }


# --- report ------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> list[str]:

    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(report["started_at"]))
    res = report["results"]
    rows = [
        [
            r["server"] + (f" x{r['processes']}" if r["processes"] > 1 else ""),
            f"{r['rate']:,.0f} ({md.value(r['achieved'], '', 0)})",
            f"{r['streaming']:,} / {r['finished']:,}",
            md.value(r["p50_ms"], " ms"),
            md.value(r["p99_ms"], " ms"),
            f"{r['lost']} / {r['duplicated']}",
            md.value(r["kib_per_connection"], " KiB"),
            md.value(r["cpu_pct"], " %"),
            md.value(r["cpu_ms_per_1000_events"], " ms"),
        ]
        for r in res["rows"]
    ]
    ratios = [
        [f"{x['rate']:,.0f}", md.value(x["p99_ratio"], "x", 2), md.value(x["cpu_ratio"], "x", 2)]
        for x in res["ratios"]
    ]
    return [
        f"# {report['title']} ({when})",
        "",
        report["description"],
        "",
        f"- Machine: {md.machine(report['machine'])}.",
        "- Config: " + ", ".join(f"{k}={v}" for k, v in report["config"].items()) + ".",
        "",
        "## Side by side",
        "",
        *md.table(
            [
                "server",
                "events/s (achieved)",
                "streaming / finished",
                "delivery p50",
                "delivery p99",
                "lost / dup",
                "memory per connection",
                "CPU (% of a core)",
                "CPU per 1,000 events",
            ],
            rows,
        ),
        "",
        "## Gateway / Centrifugo",
        "",
        *md.table(["events/s", "delivery p99", "CPU per event"], ratios),
        "",
        *md.targets(report),
        "Each run's own report: " + ", ".join(f"`{f}`" for f in res["reports"]) + ".",
    ]


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars per rate: delivery p99 and CPU per 1,000 events, gateway beside Centrifugo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]["rows"]
    rates = sorted({r["rate"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(
        axes,
        [
            ("p99_ms", "delivery p99 (ms)"),
            ("cpu_ms_per_1000_events", "CPU ms per 1,000 events"),
            ("kib_per_connection", "KiB per connection"),
        ],
        strict=True,
    ):
        for i, server in enumerate(("gateway", "centrifugo")):
            ys = [
                next((r[key] or 0 for r in rows if r["rate"] == rate and r["server"] == server), 0)
                for rate in rates
            ]
            xs = [k + (i - 0.5) * 0.38 for k in range(len(rates))]
            ax.bar(xs, ys, width=0.38, label=server)
        ax.set_xticks(range(len(rates)), [f"{rate:,.0f} ev/s" for rate in rates])
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(report["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
