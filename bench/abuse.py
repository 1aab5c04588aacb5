"""`eco2 bench abuse`: does one abusive user cost everyone else anything?

The 300-VU SSE scenario runs twice in one session against a scan API and a gateway of the
benchmark's own that enforce the production quotas (contract/settings.py's defaults, as
deploy/app/config.yaml sets them; the local stack runs without quotas): once alone, once beside
one abuser who posts at `post_factor` times the sustained scan quota and tries to open `streams`
streams, spread over the ramp-up and hold. The honest users' completion, E2E p95 and Scan API p95
must stay within 5% of the run without the abuser; the abuser must get 429s, never a 5xx, and
nothing may be lost: the load's SSE checks (no lost, duplicated or unexpected event) and every
scan the abuser got a 202 for reaching its final result.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from contract.settings import Settings

from . import harness
from .load import LoadConfig, run_load
from .stats import machine

TOLERANCE = 0.05  # the honest users' figures may move this much (relative) beside the abuser
QUOTA_FIELDS = ("scan_burst", "scan_rate_per_min", "inflight_max", "streams_max", "stream_lease_s")


@dataclass
class AbuseConfig:
    vus: int = 300
    ramp_up_s: float = 30.0
    hold_s: float = 120.0
    ramp_down_s: float = 30.0
    grace_s: float = 60.0
    model_latency: tuple[float, float] | None = (5.0, 10.0)
    post_factor: float = 100.0  # the abuser posts this many times the sustained scan quota
    streams: int = 5000  # stream opens the abuser attempts
    settle_s: float = 120.0  # how long the abuser's accepted scans may take to finish afterwards
    name: str = ""
    progress: bool = True

    def load(self, tag: str) -> LoadConfig:
        return LoadConfig(
            vus=self.vus,
            ramp_up_s=self.ramp_up_s,
            hold_s=self.hold_s,
            ramp_down_s=self.ramp_down_s,
            mode="sse",
            grace_s=self.grace_s,
            model_latency=self.model_latency,
            name=f"abuse-{tag}",
            progress=self.progress,
        )


class Abuser:
    """One user far past the quotas: a steady stream of POSTs and of stream opens."""

    def __init__(self, s: Settings, cfg: AbuseConfig) -> None:
        self.s = s
        self.cfg = cfg
        self.user = f"abuser-{uuid.uuid4().hex[:8]}"
        self.posts: collections.Counter[str] = collections.Counter()
        self.opens: collections.Counter[str] = collections.Counter()
        self.accepted: list[str] = []
        self.retry_after: collections.Counter[str] = collections.Counter()
        self.held: set[asyncio.Task[None]] = set()
        self.most_held = 0

    @property
    def post_rate(self) -> float:
        """POSTs per second: post_factor x the sustained quota."""
        return self.cfg.post_factor * self.s.scan_rate_per_min / 60.0

    async def run(self, duration_s: float) -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        timeout = httpx.Timeout(30.0, read=self.s.max_stream_s + 30)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            await asyncio.gather(self._post(http, duration_s), self._open(http, duration_s))
            for t in list(self.held):
                t.cancel()
            await asyncio.gather(*self.held, return_exceptions=True)

    async def _post(self, http: httpx.AsyncClient, duration_s: float) -> None:
        every = 1.0 / self.post_rate
        body = {"image_url": "https://images.example.com/abuse/clear_pet-bottle.jpg"}
        sent: set[asyncio.Task[None]] = set()

        async def one() -> None:
            try:
                resp = await http.post(
                    f"{self.s.api_url}/api/v1/scan", json=body, headers={"X-User-ID": self.user}
                )
            except httpx.HTTPError as exc:
                self.posts[type(exc).__name__] += 1
                return
            self.posts[str(resp.status_code)] += 1
            if resp.status_code == 202:
                self.accepted.append(resp.json()["job_id"])
            elif resp.status_code == 429:
                self.retry_after[resp.json().get("limit", "?")] += 1

        await _paced(duration_s, every, lambda: _spawn(sent, one()))
        await asyncio.gather(*sent, return_exceptions=True)

    async def _open(self, http: httpx.AsyncClient, duration_s: float) -> None:
        every = duration_s / max(self.cfg.streams, 1)
        tried: set[asyncio.Task[None]] = set()

        async def one() -> None:
            if not self.accepted:
                self.opens["no job yet"] += 1
                return
            job = self.accepted[-1]
            url = f"{self.s.gateway_url}/api/v1/scan/{job}/events"
            headers = {"X-User-ID": self.user, "Accept": "text/event-stream"}
            try:
                async with http.stream("GET", url, headers=headers) as resp:
                    self.opens[str(resp.status_code)] += 1
                    if resp.status_code == 200:  # hold it, as an abuser would, until the job ends
                        me = asyncio.current_task()
                        assert me is not None
                        self.held.add(me)
                        self.most_held = max(self.most_held, len(self.held))
                        try:
                            async for _ in resp.aiter_raw():
                                pass
                        finally:
                            self.held.discard(me)
                    else:
                        await resp.aread()
            except httpx.HTTPError as exc:
                self.opens[type(exc).__name__] += 1

        await _paced(duration_s, every, lambda: _spawn(tried, one()))
        await asyncio.gather(*(t for t in tried if t not in self.held), return_exceptions=True)

    async def unfinished(self, settle_s: float) -> list[str]:
        """The accepted scans without a final result after `settle_s` (lost ones)."""
        left = list(self.accepted)
        deadline = time.monotonic() + settle_s
        async with httpx.AsyncClient(base_url=self.s.api_url, timeout=10) as http:
            while left and time.monotonic() < deadline:
                still = []
                for job in left:
                    resp = await http.get(f"/api/v1/scan/{job}/result", headers={"X-User-ID": self.user})
                    if resp.status_code != 200:
                        still.append(job)
                left = still
                if left:
                    await asyncio.sleep(2)
        return left

    def summary(self) -> dict[str, Any]:
        fivexx = sum(n for k, n in {**self.posts, **self.opens}.items() if k.startswith("5"))
        errors = sum(
            n for k, n in {**self.posts, **self.opens}.items() if not k.isdigit() and k != "no job yet"
        )
        return {
            "user": self.user,
            "post_rate_per_s": round(self.post_rate, 2),
            "posts": dict(self.posts),
            "stream_opens": dict(self.opens),
            "refused_by_limit": dict(self.retry_after),
            "accepted_scans": len(self.accepted),
            "most_streams_held": self.most_held,
            "http_5xx": fivexx,
            "transport_errors": errors,
        }


def _spawn(tasks: set[asyncio.Task[None]], coro: Any) -> None:
    t = asyncio.get_running_loop().create_task(coro)
    tasks.add(t)


async def _paced(duration_s: float, every_s: float, start: Callable[[], None]) -> None:
    """Call `start` every `every_s` for `duration_s` (on schedule, whatever each call costs)."""
    t0 = time.monotonic()
    n = 0
    while (due := t0 + n * every_s) < t0 + duration_s:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        start()
        n += 1


@contextlib.asynccontextmanager
async def quota_services(s: Settings) -> AsyncIterator[Settings]:
    """A scan API and a gateway of the benchmark's own with the production quotas, on the stack's
    Kafka and Redis; yields the settings that point at them."""
    api_port, gw_port = harness.free_port(), harness.free_port()
    defaults = {f"ECO2_{f.upper()}": str(Settings.model_fields[f].default) for f in QUOTA_FIELDS}
    common = {**defaults, "ECO2_API_PORT": str(api_port), "ECO2_GATEWAY_PORT": str(gw_port)}
    procs = [
        harness.python_proc(s, "abuse-api", ["producers"], common),
        harness.python_proc(s, "abuse-gateway", ["gateway"], common),
    ]
    q = s.model_copy(update={"api_port": api_port, "gateway_port": gw_port})
    try:
        for p in procs:
            p.start()
        await harness.wait_http(f"{q.api_url}/ready", procs[0])
        await harness.wait_http(f"{q.gateway_url}/health", procs[1])
        yield q.model_copy(update={f: Settings.model_fields[f].default for f in QUOTA_FIELDS})
    finally:
        for p in procs:
            p.stop()


def compare(
    alone: dict[str, Any], beside: dict[str, Any], abuser: dict[str, Any], lost: int
) -> list[dict[str, Any]]:
    """The verdicts: the honest users' figures beside the abuser against the run alone."""
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, measured: str, ok: bool | None) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
        out.append({"target": name, "goal": goal, "measured": measured, "verdict": verdict})

    def within(key: str, a: float | None, b: float | None, higher_is_worse: bool = True) -> None:
        if a is None or b is None or a <= 0:
            add(key, f"within {TOLERANCE:.0%} of the run alone", f"{a} -> {b}", None)
            return
        ratio = b / a
        ok = ratio <= 1 + TOLERANCE if higher_is_worse else ratio >= 1 - TOLERANCE
        add(key, f"within {TOLERANCE:.0%} of the run alone", f"{a:g} -> {b:g} ({ratio:.3f}x)", ok)

    ra, rb = alone["results"], beside["results"]
    within("completion", ra["completion_rate"], rb["completion_rate"], higher_is_worse=False)
    within("E2E p95 (s)", ra["e2e_s"]["p95"], rb["e2e_s"]["p95"])
    within("Scan API p95 (ms)", ra["scan_api_ms"]["p95"], rb["scan_api_ms"]["p95"])
    refused = abuser["posts"].get("429", 0) + abuser["stream_opens"].get("429", 0)
    add("abuser refused with 429s", "> 0", str(refused), refused > 0)
    add("abuser 5xx", "0", str(abuser["http_5xx"]), abuser["http_5xx"] == 0)
    bad = sum(r["results"]["sse"][k] for r in (alone, beside) for k in ("lost", "duplicated", "unexpected"))
    add("honest users' SSE lost/duplicated/unexpected events", "0", str(bad), bad == 0)
    add("abuser's accepted scans without a final result", "0", str(lost), lost == 0)
    return out


async def run_abuse(s: Settings, cfg: AbuseConfig) -> dict[str, Any]:
    await harness.require(s, ["api", "workers", "model", "router", "gateway"])
    say = (lambda line: print(line, flush=True)) if cfg.progress else (lambda line: None)
    started = time.time()
    async with quota_services(s) as q:
        policy = {f: getattr(q, f) for f in QUOTA_FIELDS}
        say(f"abuse: quotas {policy}; run 1 of 2: {cfg.vus} VUs alone")
        alone = await run_load(q, cfg.load("alone"), stack=s)
        abuser = Abuser(q, cfg)
        say(
            f"run 2 of 2: {cfg.vus} VUs beside {abuser.user}, {abuser.post_rate:g} POSTs/s "
            f"and {cfg.streams} stream opens over {cfg.ramp_up_s + cfg.hold_s:g} s"
        )
        beside, _ = await asyncio.gather(
            run_load(q, cfg.load("beside"), stack=s), abuser.run(cfg.ramp_up_s + cfg.hold_s)
        )
        lost = await abuser.unfinished(cfg.settle_s)
    summary = abuser.summary()
    summary["accepted_scans_unfinished"] = len(lost)
    return {
        "kind": "abuse",
        "name": cfg.name or f"abuse-{cfg.vus}vu",
        "started_at": started,
        "config": asdict(cfg),
        "quotas": policy,
        "machine": machine(),
        "alone": _slim(alone),
        "beside": _slim(beside),
        "abuser": summary,
        "targets": compare(alone, beside, summary, len(lost)),
    }


def _slim(load: dict[str, Any]) -> dict[str, Any]:
    """A load report without its per-second series (the abuse report compares the totals)."""
    return {k: v for k, v in load.items() if k != "series"}


# --- report -----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> list[str]:
    c, a, b, ab = report["config"], report["alone"], report["beside"], report["abuser"]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(report["started_at"]))
    q = report["quotas"]
    lines = [
        f"# Abuse `{report['name']}` ({when})",
        "",
        f"- Scenario: {c['vus']} SSE VUs (ramp {c['ramp_up_s']:g} s, hold {c['hold_s']:g} s, ramp down"
        f" {c['ramp_down_s']:g} s), run alone and then beside one abuser, against a scan API and a gateway"
        " of the benchmark's own with the production quotas.",
        f"- Quotas: burst {q['scan_burst']}, {q['scan_rate_per_min']:g} scans/min,"
        f" {q['inflight_max']} in flight, {q['streams_max']} streams (lease {q['stream_lease_s']} s).",
        f"- Abuser: {ab['post_rate_per_s']:g} POSTs/s ({c['post_factor']:g}x the sustained quota) and"
        f" {c['streams']:,} stream opens over {c['ramp_up_s'] + c['hold_s']:g} s.",
        "",
        "| target | goal | measured | verdict |",
        "|---|---|---|---|",
        *(
            f"| {t['target']} | {t['goal']} | {t['measured']} | **{t['verdict']}** |"
            for t in report["targets"]
        ),
        "",
        "| honest users | alone | beside the abuser |",
        "|---|---:|---:|",
    ]
    rows = [
        ("jobs completed", lambda r: r["jobs_completed"]),
        ("completion", lambda r: f"{100 * (r['completion_rate'] or 0):.2f}%"),
        ("E2E p95 (s)", lambda r: r["e2e_s"]["p95"]),
        ("Scan API p95 (ms)", lambda r: r["scan_api_ms"]["p95"]),
        ("SSE delivery p99 (ms)", lambda r: r["sse"]["delivery_ms"]["p99"]),
        ("POST errors", lambda r: r["post_errors"] or "none"),
    ]
    for label, get in rows:
        lines.append(f"| {label} | {get(a['results'])} | {get(b['results'])} |")
    lines += [
        "",
        f"Abuser: POSTs {ab['posts']}, stream opens {ab['stream_opens']}, refusals by limit"
        f" {ab['refused_by_limit']}; {ab['accepted_scans']} scans accepted"
        f" ({ab['accepted_scans_unfinished']} without a final result), at most {ab['most_streams_held']}"
        f" streams held at once; {ab['http_5xx']} 5xx, {ab['transport_errors']} transport errors.",
    ]
    return lines


def plot(report: dict[str, Any], path: Any) -> None:
    """Alone beside abused, one panel per honest-user figure, and the abuser's answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = report["alone"]["results"], report["beside"]["results"]
    figures = [
        ("completion (%)", 100 * (a["completion_rate"] or 0), 100 * (b["completion_rate"] or 0)),
        ("E2E p95 (s)", a["e2e_s"]["p95"] or 0, b["e2e_s"]["p95"] or 0),
        ("Scan API p95 (ms)", a["scan_api_ms"]["p95"] or 0, b["scan_api_ms"]["p95"] or 0),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, (label, x, y) in zip(axes[:3], figures, strict=True):
        ax.bar(["alone", "beside abuser"], [x, y], color=["#7f8c8d", "#2980b9"])
        ax.set_title(label)
        ax.axhline(x * (1 + TOLERANCE), color="#c0392b", lw=0.8, ls="--")
    ab = report["abuser"]
    answers = {f"POST {k}": v for k, v in ab["posts"].items()}
    answers.update({f"stream {k}": v for k, v in ab["stream_opens"].items()})
    axes[3].barh(list(answers), list(answers.values()), color="#8e44ad")
    axes[3].set_title("abuser's answers")
    fig.suptitle(f"{report['name']}: the honest users alone and beside one abuser (dashed: +5%)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
