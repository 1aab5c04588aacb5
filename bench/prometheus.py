"""A real Prometheus (Debian's /usr/bin/prometheus) over the local stack's processes.

The rule groups are the ones of deploy/monitoring/rules.yaml (the PrometheusRule's spec), never a
copy; `render_rules` may cap each `for` and range window, and says which it changed, so a run
that shortens them shows it in its report. The scrape targets are the stack table's processes
(eco2/services.py) on this checkout's ports, labelled as the PodMonitors label pods (`pod`,
`component`, job named after the PodMonitor), so the rules' `by (pod)` and `by (group)` hold.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from contract.settings import Settings

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "rules.yaml"
DASHBOARD = MONITORING / "eco2-dashboard.json"
BINARY = "/usr/bin/prometheus"
PORTS = range(19090, 19100)  # where a run may put its Prometheus (first free one)

# Which PodMonitor (deploy/monitoring/podmonitors.yaml) scrapes which stack process.
HTTP_COMPONENTS = ("api", "gateway")
CONSUMER_COMPONENTS = ("workers", "router", "writer")

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_RANGE = re.compile(r"\[([0-9smhdwy]+)(:[0-9smhdwy]*)?\]")


def seconds(duration: str) -> float:
    """A Prometheus duration ("1h30m", "90s") in seconds."""
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def duration(s: float) -> str:
    return f"{int(s)}s" if s == int(s) else f"{int(s * 1000)}ms"


def rule_groups(path: Path = RULES) -> list[dict[str, Any]]:
    """The rule groups of the PrometheusRule in `path`, as the operator hands them to Prometheus."""
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "PrometheusRule"]
    return copy.deepcopy(doc["spec"]["groups"])


@dataclass(frozen=True)
class Change:
    alert: str
    what: str  # "for" or "window"
    real: str
    rendered: str


@dataclass(frozen=True)
class Caps:
    """Upper bounds for a run that cannot wait 15 minutes per alert (None: keep the real value)."""

    for_s: float | None = None
    window_s: float | None = None
    for_by_alert: dict[str, float] = field(default_factory=dict)  # a tighter cap for one alert


def render_rules(groups: list[dict[str, Any]], caps: Caps = Caps()) -> tuple[dict[str, Any], list[Change]]:
    """A Prometheus rule file of `groups`; each `for` and each range window above its cap is cut
    to the cap. Returns the file and every change made (empty: the rules as deployed)."""
    out = copy.deepcopy(groups)
    changes: list[Change] = []
    for g in out:
        for r in g["rules"]:
            name = r.get("alert") or r.get("record") or "?"
            cap = caps.for_by_alert.get(name, caps.for_s)
            if cap is not None and "for" in r and seconds(r["for"]) > cap:
                changes.append(Change(name, "for", r["for"], duration(cap)))
                r["for"] = duration(cap)
            if caps.window_s is not None:
                r["expr"] = _cap_windows(name, r["expr"], caps.window_s, changes)
    return {"groups": out}, changes


def _cap_windows(name: str, expr: str, cap_s: float, changes: list[Change]) -> str:
    def cut(m: re.Match[str]) -> str:
        real = m.group(1)
        if seconds(real) <= cap_s:
            return m.group(0)
        changes.append(Change(name, "window", real, duration(cap_s)))
        return f"[{duration(cap_s)}{m.group(2) or ''}]"

    return _RANGE.sub(cut, expr)


def alert_fors(rules: dict[str, Any]) -> dict[str, float]:
    """Each alert's `for` in seconds (0 when it has none), from a rendered rule file."""
    return {
        r["alert"]: seconds(r["for"]) if "for" in r else 0.0
        for g in rules["groups"]
        for r in g["rules"]
        if "alert" in r
    }


@dataclass(frozen=True)
class Target:
    job: str  # the PodMonitor's name, as the operator's job label ends
    address: str
    pod: str
    component: str


def targets(s: Settings) -> list[Target]:
    """Every stack process that serves /metrics, on this checkout's ports (replicas included)."""
    from eco2 import services

    out = []
    for svc in services.services({"app"}, s):
        component = next(
            (c for c in (*HTTP_COMPONENTS, *CONSUMER_COMPONENTS) if c in (svc.name, *svc.groups)), None
        )
        if component is None:
            continue  # the model stand-in exports nothing
        job = "eco2-http" if component in HTTP_COMPONENTS else "eco2-consumers"
        out.append(Target(job, f"127.0.0.1:{svc.port(s)}", svc.name, component))
    return out


def render_config(tgts: list[Target], rule_file: str, interval_s: float) -> dict[str, Any]:
    """prometheus.yml: one job per PodMonitor, static targets, scrape and evaluation every
    `interval_s` (the scrape timeout too: a stalled process is down, not slow)."""
    jobs: dict[str, list[Target]] = {}
    for t in tgts:
        jobs.setdefault(t.job, []).append(t)
    every = duration(interval_s)
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": every},
        "rule_files": [rule_file],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [t.address], "labels": {"pod": t.pod, "component": t.component}} for t in ts
                ],
            }
            for job, ts in sorted(jobs.items())
        ],
    }


def dashboard_queries(path: Path = DASHBOARD, rate_interval: str = "1m") -> dict[str, str]:
    """Every query of the Grafana dashboard ("title refId" -> PromQL), Grafana's variables
    substituted as Grafana would for a `rate_interval` range."""
    board = json.loads(path.read_text())
    subst = {"$__rate_interval": rate_interval, "$__interval": rate_interval, "$__range": rate_interval}
    out = {}
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in subst.items():
                expr = expr.replace(var, value).replace("${" + var[1:] + "}", value)
            if "$" in expr:
                raise ValueError(f"panel {panel['title']}: unsubstituted variable in {expr!r}")
            out[f"{panel['title']} {t['refId']}"] = expr
    return out


def free_port(ports: range = PORTS) -> int:
    import socket

    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1} for Prometheus")


class Prometheus:
    """The HTTP API of a running Prometheus."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log
        self.http = httpx.AsyncClient(base_url=url, timeout=10)

    async def _get(self, path: str, **params: str) -> Any:
        r = await self.http.get(path, params=params)
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"{path}: {body}")
        return body["data"]

    async def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending or firing) as /api/v1/alerts lists them."""
        data = await self._get("/api/v1/alerts")
        return list(data["alerts"])

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self._get("/api/v1/query", query=expr)
        return list(data["result"])

    async def targets_up(self) -> dict[str, bool]:
        data = await self._get("/api/v1/targets", state="active")
        return {t["labels"]["pod"]: t["health"] == "up" for t in data["activeTargets"]}

    async def rule_health(self) -> dict[str, str]:
        data = await self._get("/api/v1/rules", type="alert")
        return {r["name"]: r["health"] for g in data["groups"] for r in g["rules"]}


@asynccontextmanager
async def running(
    s: Settings,
    rules: dict[str, Any],
    interval_s: float = 1.0,
    port: int | None = None,
    scrape: list[Target] | None = None,
) -> AsyncIterator[Prometheus]:
    """Prometheus on 127.0.0.1 (a port of PORTS), scraping the stack (or `scrape`) with `rules`;
    stopped and its data removed on exit."""
    if not Path(BINARY).exists():
        raise RuntimeError(f"no {BINARY}: `eco2 stack up` installs Debian's prometheus")
    port = port or free_port()
    work = Path(tempfile.mkdtemp(prefix="eco2-prometheus-"))
    (work / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = render_config(targets(s) if scrape is None else scrape, "rules.yaml", interval_s)
    (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = work / "prometheus.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [
                BINARY,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=2h",
                "--rules.alert.resend-delay=1s",
            ],
            cwd=work,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if (await prom.http.get("/-/ready")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after 60 s: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.2)
        yield prom
    finally:
        await prom.http.aclose()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


# --- watching alerts -------------------------------------------------------------------------


@dataclass
class Seen:
    """One alert's states, in seconds since the watch's mark (None: not (yet) seen)."""

    pending_s: float | None = None
    firing_s: float | None = None
    resolved_s: float | None = None
    labels: list[dict[str, str]] = field(default_factory=list)


class Watch:
    """Samples /api/v1/alerts every `every_s` and keeps, per alert name since `mark()`, when it
    was first pending, first firing, and when it was last seen before it went away."""

    def __init__(self, prom: Prometheus, every_s: float = 0.25) -> None:
        self.prom = prom
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.seen: dict[str, Seen] = {}
        self.active: set[str] = set()
        self.ever: set[str] = set()  # every alert name seen since the watch began
        self._task: asyncio.Task[None] | None = None

    def mark(self) -> None:
        """A new phase: times count from now; alerts still active carry over as already pending."""
        self.t0 = time.monotonic()
        self.seen = {name: Seen(pending_s=0.0) for name in self.active}

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def sample(self) -> None:
        alerts = await self.prom.alerts()
        t = self.now()
        states: dict[str, set[str]] = {}
        for a in alerts:
            name = a["labels"]["alertname"]
            states.setdefault(name, set()).add(a["state"])
            seen = self.seen.setdefault(name, Seen())
            labels = {k: v for k, v in a["labels"].items() if k not in ("alertname", "severity")}
            if labels not in seen.labels:
                seen.labels.append(labels)
        for name, st in states.items():
            seen = self.seen[name]
            seen.resolved_s = None
            if seen.pending_s is None:
                seen.pending_s = t
            if "firing" in st and seen.firing_s is None:
                seen.firing_s = t
        for name in self.active - set(states):
            if name in self.seen:
                self.seen[name].resolved_s = t
        self.active = set(states)
        self.ever |= self.active

    async def _loop(self) -> None:
        while True:
            try:
                await self.sample()
            except (httpx.HTTPError, RuntimeError):
                pass
            await asyncio.sleep(self.every_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def until(self, name: str, state: str, timeout_s: float) -> bool:
        """Wait until alert `name` reached `state` ("firing" or "resolved") in this phase."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen = self.seen.get(name)
            if seen is not None:
                if state == "firing" and seen.firing_s is not None:
                    return True
                if state == "resolved" and seen.resolved_s is not None and name not in self.active:
                    return True
            await asyncio.sleep(self.every_s)
        return False
