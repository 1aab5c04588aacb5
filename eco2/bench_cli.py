"""`eco2 bench ...`: the load test and micro-benchmarks (bench/), reports into bench/reports/."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from contract.settings import get_settings

bench_app = typer.Typer(help="Load test and micro-benchmarks of the running stack (see docs/benchmarks.md).")

OutOpt = Annotated[Path | None, typer.Option("--out", help="report directory (default bench/reports)")]
NameOpt = Annotated[str, typer.Option("--name", help="report name (default from the parameters)")]


def _finish(report: dict[str, Any], out: Path | None) -> None:
    from bench import report as rep

    paths = rep.write(report, out)
    for t in report.get("targets", []):
        colour = {"PASS": "green", "MISS": "red"}.get(t["verdict"], "yellow")
        verdict = typer.style(f"{t['verdict']:<4}", fg=colour, bold=True)
        typer.echo(f"{verdict} {t['target']}: {t['measured']} (goal {t['goal']})")
    for p in paths.values():
        typer.echo(f"wrote {p}")


def _run(coro: Any) -> Any:
    from bench.harness import BenchError, stoppable

    try:
        return asyncio.run(stoppable(coro))
    except BenchError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc


@bench_app.command("load")
def load(
    vus: Annotated[int, typer.Option("--vus", help="virtual users at the hold")] = 300,
    mode: Annotated[str, typer.Option("--mode", help="polling (as the original) or sse")] = "polling",
    ramp_up: Annotated[float, typer.Option("--ramp-up", help="seconds from 0 to --vus")] = 30.0,
    hold: Annotated[float, typer.Option("--hold", help="seconds at --vus")] = 120.0,
    ramp_down: Annotated[float, typer.Option("--ramp-down", help="seconds from --vus to 0")] = 30.0,
    grace: Annotated[
        float, typer.Option("--grace", help="max seconds for running jobs after the ramp-down")
    ] = 60.0,
    poll_interval: Annotated[
        float, typer.Option("--poll-interval", help="polling mode: seconds between polls")
    ] = 2.5,
    job_timeout: Annotated[
        float, typer.Option("--job-timeout", help="a VU gives up on a job after this")
    ] = 180.0,
    model_latency: Annotated[
        str,
        typer.Option("--model-latency", help="simulated model seconds per call MIN,MAX for the run, or keep"),
    ] = "5,10",
    quiet: Annotated[bool, typer.Option("--quiet", help="no live progress line")] = False,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """The original's scenario: VUs ramp up, hold, ramp down; each loops POST scan -> wait -> repeat."""
    from bench.harness import parse_latency
    from bench.load import LoadConfig, run_load

    if mode not in ("polling", "sse"):
        raise typer.BadParameter("--mode must be polling or sse")
    cfg = LoadConfig(
        vus=vus,
        ramp_up_s=ramp_up,
        hold_s=hold,
        ramp_down_s=ramp_down,
        mode=mode,  # type: ignore[arg-type]
        poll_interval_s=poll_interval,
        job_timeout_s=job_timeout,
        grace_s=grace,
        model_latency=parse_latency(model_latency),
        name=name,
        progress=not quiet,
    )
    _finish(_run(run_load(get_settings(), cfg)), out)


@bench_app.command("soak")
def soak(
    duration: Annotated[
        str, typer.Option("--duration", help="how long the load runs: 90s, 10m, 1h (bare number = s)")
    ] = "60m",
    vus: Annotated[int, typer.Option("--vus", help="virtual users at the hold")] = 300,
    ramp_up: Annotated[
        float | None, typer.Option("--ramp-up", help="seconds from 0 to --vus (default min(60, 10%))")
    ] = None,
    ramp_down: Annotated[
        float | None, typer.Option("--ramp-down", help="seconds from --vus to 0 (default min(30, 10%))")
    ] = None,
    sample_every: Annotated[float, typer.Option("--sample-every", help="seconds between samples")] = 10.0,
    model_latency: Annotated[
        str,
        typer.Option("--model-latency", help="simulated model seconds per call MIN,MAX for the run, or keep"),
    ] = "5,10",
    resume: Annotated[float, typer.Option("--resume", help="share of streams dropped and resumed")] = 0.10,
    abandon: Annotated[float, typer.Option("--abandon", help="share of streams abandoned")] = 0.05,
    permanent: Annotated[
        float, typer.Option("--permanent", help="share of jobs with a permanent fault")
    ] = 0.02,
    transient: Annotated[float, typer.Option("--transient", help="share of jobs with two 503s")] = 0.02,
    gaps: Annotated[float, typer.Option("--gaps", help="share of jobs whose answer has gaps")] = 0.03,
    poll_interval: Annotated[
        float, typer.Option("--poll-interval", help="abandoned streams: seconds between result polls")
    ] = 2.5,
    drain_timeout: Annotated[
        float, typer.Option("--drain-timeout", help="max seconds for the consumer lag to reach 0 after")
    ] = 120.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress lines")] = False,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """Hold the SSE scenario (with resumes, abandoned streams and model faults) and judge whether
    anything grows: RSS, fds, asyncio tasks, Redis keys, lag, storage (bench/soak.py)."""
    from bench.harness import parse_latency
    from bench.soak import SoakConfig, parse_duration, run_soak

    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    shares = (resume, abandon, permanent, transient, gaps)
    if min(shares) < 0 or resume + abandon > 1 or permanent + transient + gaps > 1:
        raise typer.BadParameter(
            "shares are 0..1; --resume + --abandon and the three faults each sum to <= 1"
        )
    cfg = SoakConfig(
        duration_s=seconds,
        vus=vus,
        ramp_up_s=ramp_up if ramp_up is not None else min(60.0, seconds / 10),
        ramp_down_s=ramp_down if ramp_down is not None else min(30.0, seconds / 10),
        sample_every_s=sample_every,
        model_latency=parse_latency(model_latency),
        resume_share=resume,
        abandon_share=abandon,
        permanent_share=permanent,
        transient_share=transient,
        gaps_share=gaps,
        poll_interval_s=poll_interval,
        drain_timeout_s=drain_timeout,
        name=name,
        progress=not quiet,
    )
    _finish(_run(run_soak(get_settings(), cfg, typer.echo)), out)


@bench_app.command("pipeline")
def pipeline(
    jobs: Annotated[int, typer.Option("--jobs", help="jobs to submit")] = 2000,
    concurrency: Annotated[int, typer.Option("--concurrency", help="POSTs in flight")] = 50,
    postgres: Annotated[
        bool, typer.Option("--postgres/--no-postgres", help="also wait for the writer")
    ] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="max seconds to wait for the jobs")] = 300.0,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """Jobs/s through API, stages, router and writer with a zero-latency model."""
    from bench.micro_pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(jobs=jobs, concurrency=concurrency, postgres=postgres, timeout_s=timeout, name=name)
    _finish(_run(run_pipeline(get_settings(), cfg, typer.echo)), out)


@bench_app.command("router")
def router(
    events: Annotated[int, typer.Option("--events", help="synthetic events")] = 100_000,
    batch: Annotated[int, typer.Option("--batch", help="events per Redis round trip (0 = the router's)")] = 0,
    lag_drain: Annotated[
        bool, typer.Option("--lag-drain/--direct-only", help="also time a real router draining a backlog")
    ] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="max seconds per phase")] = 300.0,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """Router events/s: StateStore.apply directly, and a private router draining a Kafka backlog."""
    from bench.micro_router import RouterConfig, run_router

    cfg = RouterConfig(events=events, batch=batch, lag_drain=lag_drain, timeout_s=timeout, name=name)
    _finish(_run(run_router(get_settings(), cfg, typer.echo)), out)


StreamsOpt = Annotated[
    int,
    typer.Option(
        "--streams",
        help="jobs each client follows one after the other, a new stream each (> 1: streams that end)",
    ),
]


@bench_app.command("fanout")
def fanout(
    clients: Annotated[int, typer.Option("--clients", help="concurrent SSE clients")] = 10_000,
    rate: Annotated[
        float,
        typer.Option("--rate", help="events/s in total (0 = clients x 10 / 15 s: every client's job live)"),
    ] = 0.0,
    connect_rate: Annotated[float, typer.Option("--connect-rate", help="new connections per second")] = 500.0,
    timeout: Annotated[float, typer.Option("--timeout", help="max seconds per client stream")] = 300.0,
    gateways: Annotated[int, typer.Option("--gateways", help="gateway processes sharing the port")] = 1,
    streams: StreamsOpt = 1,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """SSE fan-out of (private) gateway processes: delivery latency, memory and Redis connections."""
    from bench.micro_fanout import FanoutConfig, run_fanout

    cfg = FanoutConfig(
        clients=clients,
        rate=rate,
        connect_rate=connect_rate,
        timeout_s=timeout,
        name=name,
        gateways=gateways,
        streams=streams,
    )
    _finish(_run(run_fanout(get_settings(), cfg, typer.echo)), out)


@bench_app.command("peer")
def peer(
    clients: Annotated[int, typer.Option("--clients", help="concurrent SSE clients")] = 10_000,
    rates: Annotated[str, typer.Option("--rates", help="events/s in total, comma-separated")] = "1000,6667",
    gateways: Annotated[int, typer.Option("--gateways", help="gateway processes sharing the port")] = 1,
    streams: StreamsOpt = 1,
    build: Annotated[
        bool, typer.Option("--build", help="go install the pinned Centrifugo into .local/bin first")
    ] = False,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """The fan-out benchmark against the gateway and against Centrifugo, side by side (never in
    `make test`; skipped with a message where Centrifugo is missing and Go cannot build it)."""
    from bench import report as rep
    from bench.peer import (
        PeerConfig,
        PeerMissing,
        build_centrifugo,
        centrifugo_binary,
        missing_peer_message,
        run_peer,
    )

    s = get_settings()
    try:
        if build and centrifugo_binary(s) is None:
            build_centrifugo(s, typer.echo)
    except PeerMissing as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(0) from exc
    cfg = PeerConfig(
        clients=clients,
        rates=tuple(float(r) for r in rates.split(",") if r),
        gateways=gateways,
        streams=streams,
        name=name,
    )
    if centrifugo_binary(s) is None:
        typer.secho(missing_peer_message(), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(0)
    _finish(_run(run_peer(s, cfg, lambda one: rep.write(one, out)["json"].name, typer.echo)), out)


@bench_app.command("chaos")
def chaos(
    vus: Annotated[
        int | None, typer.Option("--vus", help="SSE virtual users [30; 60 with --rollout]")
    ] = None,
    hold: Annotated[
        float, typer.Option("--hold", help="seconds at --vus; the faults are spread over it")
    ] = 200.0,
    warmup: Annotated[float, typer.Option("--warmup", help="seconds of load before the first fault")] = 15.0,
    faults: Annotated[
        str | None,
        typer.Option(
            "--faults",
            help="comma-separated, in order: api,workers,router,gateway,writer,kafka,postgres,redis,flush "
            "[all; with --rollout: workers,router,writer,gateway,api]",
        ),
    ] = None,
    rollout: Annotated[
        bool,
        typer.Option(
            "--rollout",
            help="a Deployment rollout: SIGTERM each component in turn (it drains) and restart it; "
            "also checks that no model call was repeated",
        ),
    ] = False,
    model_latency: Annotated[
        str | None,
        typer.Option(
            "--model-latency",
            help="simulated model seconds per call MIN,MAX, or keep [1,2; 5,10 with --rollout]",
        ),
    ] = None,
    settle: Annotated[
        float, typer.Option("--settle", help="max seconds to wait for Postgres rows afterwards")
    ] = 180.0,
    late_joiners: Annotated[
        int, typer.Option("--late-joiners", help="streams re-read afterwards (0 = all)")
    ] = 0,
    seed_log: Annotated[
        int,
        typer.Option(
            "--seed-log",
            help="first produce N events of old finished jobs to scan.events (a day is ~1.1 million): "
            "the log a flushed view is rebuilt from",
        ),
    ] = 0,
    kafka_down: Annotated[
        float,
        typer.Option(
            "--kafka-down",
            help="seconds Kafka stays stopped in the kafka fault (e.g. 150: an outage of minutes); "
            "after it every consumer must resume by itself",
        ),
    ] = 0.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="no live progress line")] = False,
    alerts: Annotated[
        bool,
        typer.Option(
            "--alerts",
            help="instead: the alert rules in a real Prometheus, quiet on a clean load, firing on "
            "real faults (bench/alerts.py; --vus, --hold = clean load [90 s], --faults from "
            "poison,stall,router,writer,redis,kafka,flush)",
        ),
    ] = False,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """Load (SSE VUs) while every component is killed or restarted on a timeline; then checks that
    nothing accepted was lost, no stream had a gap or duplicate, and no 5xx but declared 503s.
    With --rollout, each component gets SIGTERM in turn instead (see docs/benchmarks.md).
    With --alerts: the alerts of deploy/monitoring/rules.yaml in a real Prometheus instead."""
    from bench.chaos import FAULTS, ROLLOUT, ChaosConfig, run_chaos
    from bench.harness import parse_latency

    if alerts:
        _chaos_alerts(vus, hold, faults, model_latency, name, out, quiet)
        return
    chosen = faults if faults is not None else ",".join(ROLLOUT if rollout else FAULTS)
    kw: dict[str, Any] = {
        "hold_s": hold,
        "warmup_s": warmup,
        "faults": tuple(x.strip() for x in chosen.split(",") if x.strip()),
        "settle_s": settle,
        "late_joiners": late_joiners,
        "seed_log": seed_log,
        "kafka_down_s": kafka_down,
        "name": name,
        "progress": not quiet,
    }
    if vus is not None:
        kw["vus"] = vus
    if model_latency is not None:
        kw["model_latency"] = parse_latency(model_latency)
    elif not rollout:
        kw["model_latency"] = parse_latency("1,2")
    cfg = ChaosConfig.for_rollout(**kw) if rollout else ChaosConfig(**kw)
    report = _run(run_chaos(get_settings(), cfg, typer.echo))
    _finish(report, out)
    if any(t["verdict"] == "MISS" for t in report["targets"]):
        raise typer.Exit(2)


def _chaos_alerts(
    vus: int | None,
    hold: float,
    faults: str | None,
    model_latency: str | None,
    name: str,
    out: Path | None,
    quiet: bool,
) -> None:
    from bench.alerts import FAULTS, AlertsConfig, run_alerts
    from bench.harness import parse_latency

    kw: dict[str, Any] = {"name": name, "progress": not quiet}
    if vus is not None:
        kw["vus"] = vus
    if hold != 200.0:  # 200 s is the kill timeline's default, not the clean load's
        kw["clean_s"] = hold
    if model_latency is not None:
        kw["model_latency"] = parse_latency(model_latency)
    chosen = faults if faults is not None else ",".join(FAULTS)
    kw["faults"] = tuple(x.strip() for x in chosen.split(",") if x.strip())
    report = _run(run_alerts(get_settings(), AlertsConfig(**kw), typer.echo))
    _finish(report, out)
    if any(t["verdict"] == "MISS" for t in report["targets"]):
        raise typer.Exit(2)


@bench_app.command("abuse")
def abuse(
    vus: Annotated[int, typer.Option("--vus", help="honest SSE virtual users")] = 300,
    ramp_up: Annotated[float, typer.Option("--ramp-up", help="seconds from 0 to --vus")] = 30.0,
    hold: Annotated[float, typer.Option("--hold", help="seconds at --vus")] = 120.0,
    ramp_down: Annotated[float, typer.Option("--ramp-down", help="seconds from --vus to 0")] = 30.0,
    post_factor: Annotated[
        float, typer.Option("--post-factor", help="the abuser posts this many times the sustained quota")
    ] = 100.0,
    streams: Annotated[int, typer.Option("--streams", help="stream opens the abuser attempts")] = 5000,
    model_latency: Annotated[
        str, typer.Option("--model-latency", help="simulated model seconds per call MIN,MAX, or keep")
    ] = "5,10",
    quiet: Annotated[bool, typer.Option("--quiet", help="no live progress line")] = False,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """The SSE scenario twice against quota'd API and gateway processes: alone, then beside one
    abuser far past the quotas; the honest users must not notice, the abuser gets 429s."""
    from bench.abuse import AbuseConfig, run_abuse
    from bench.harness import parse_latency

    cfg = AbuseConfig(
        vus=vus,
        ramp_up_s=ramp_up,
        hold_s=hold,
        ramp_down_s=ramp_down,
        post_factor=post_factor,
        streams=streams,
        model_latency=parse_latency(model_latency),
        name=name,
        progress=not quiet,
    )
    report = _run(run_abuse(get_settings(), cfg))
    _finish(report, out)
    if any(t["verdict"] == "MISS" for t in report["targets"]):
        raise typer.Exit(2)


@bench_app.command("table")
def table(
    reports: Annotated[
        Path | None, typer.Option("--reports", help="report directory (default bench/reports)")
    ] = None,
    write_docs: Annotated[
        bool, typer.Option("--write-docs", help="also replace the generated block of docs/benchmarks.md")
    ] = False,
) -> None:
    """Our latest reports beside the original's figures, as markdown (the results of docs/benchmarks.md)."""
    from bench import report as rep

    section = rep.results_section(rep.load_reports(reports))
    typer.echo(section)
    if write_docs:
        if not rep.write_docs(section):
            typer.secho(f"{rep.DOCS} has no {rep.START} ... {rep.END} block", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        typer.echo(f"updated {rep.DOCS}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@bench_app.command("suite")
def suite(
    vus: Annotated[str, typer.Option("--vus", help="polling runs at these VUs")] = "50,200,300,1000",
    sse_vus: Annotated[str, typer.Option("--sse-vus", help="SSE runs at these VUs")] = "300,1000",
    micro: Annotated[bool, typer.Option("--micro/--no-micro", help="also the three micro-benchmarks")] = True,
    pause: Annotated[float, typer.Option("--pause", help="seconds of rest between runs")] = 20.0,
    write_docs: Annotated[
        bool, typer.Option("--write-docs/--no-docs", help="update docs/benchmarks.md")
    ] = True,
    out: OutOpt = None,
) -> None:
    """Every full run of docs/benchmarks.md, one after the other (about 30 minutes), then the table."""
    import time

    from bench.load import LoadConfig, run_load
    from bench.micro_fanout import FanoutConfig, run_fanout
    from bench.micro_pipeline import PipelineConfig, run_pipeline
    from bench.micro_router import RouterConfig, run_router

    s = get_settings()
    runs: list[tuple[str, Any]] = [(f"load polling {n} VUs", LoadConfig(vus=n)) for n in _ints(vus)]
    runs += [(f"load sse {n} VUs", LoadConfig(vus=n, mode="sse")) for n in _ints(sse_vus)]
    if micro:
        runs += [
            ("pipeline", PipelineConfig()),
            ("router", RouterConfig()),
            ("fanout, every client's job live", FanoutConfig()),
            ("fanout at 1,000 events/s", FanoutConfig(rate=1000.0, name="fanout-10000-1000eps")),
        ]
    for i, (what, cfg) in enumerate(runs):
        if i:
            time.sleep(pause)  # let the stack drain what the previous run left in flight
        typer.secho(f"== {i + 1}/{len(runs)}: {what}", bold=True)
        if isinstance(cfg, LoadConfig):
            report = _run(run_load(s, cfg))
        elif isinstance(cfg, PipelineConfig):
            report = _run(run_pipeline(s, cfg, typer.echo))
        elif isinstance(cfg, RouterConfig):
            report = _run(run_router(s, cfg, typer.echo))
        else:
            report = _run(run_fanout(s, cfg, typer.echo))
        _finish(report, out)
    table(reports=out, write_docs=write_docs)


@bench_app.command("scaleout")
def scaleout(
    processes: Annotated[int, typer.Option("--processes", help="measure 1..N worker processes")] = 3,
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="jobs in flight per stage per process")
    ] = 2,
    model_latency: Annotated[float, typer.Option("--model-latency", help="seconds per model call")] = 1.0,
    jobs: Annotated[int, typer.Option("--jobs", help="burst offered at every step")] = 96,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """Throughput at 1..N stage-worker processes on a private 3-node stack (docs/benchmarks.md)."""
    from bench.scaleout import ScaleoutConfig, run_scaleout

    cfg = ScaleoutConfig(
        processes=processes, concurrency=concurrency, model_latency_s=model_latency, jobs=jobs, name=name
    )
    _finish(_run(run_scaleout(get_settings(), cfg)), out)


@bench_app.command("ab", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ab(
    ctx: typer.Context,
    base: Annotated[str, typer.Option("--base", help="the git ref to compare against (side A)")],
    runs: Annotated[int, typer.Option("--runs", help="runs of each side, alternating A B A B ...")] = 3,
    pause: Annotated[float, typer.Option("--pause", help="seconds of rest between runs")] = 10.0,
    warmup_jobs: Annotated[
        int,
        typer.Option(
            "--warmup-jobs",
            help="jobs of an untimed `bench pipeline` on each fresh stack before its measured run "
            "(warms the broker's JIT; 3000 for CPU-per-job figures; 0 = none)",
        ),
    ] = 0,
    keep: Annotated[
        bool, typer.Option("--keep", help="keep the temporary worktree, stack dirs and logs")
    ] = False,
    name: NameOpt = "",
    out: OutOpt = None,
) -> None:
    """One benchmark against REF's checkout (A) and the working tree (B), alternating on this box,
    each run on a fresh private stack of its side's code: every figure of both, B/A and the spread
    (bench/ab.py). The bench command and its options follow `--`, e.g.
    `eco2 bench ab --base main --runs 3 -- load --mode sse --vus 300 --quiet`."""
    from bench.ab import AbConfig, run_ab
    from bench.harness import BenchError

    cfg = AbConfig(
        base=base,
        bench_args=list(ctx.args),
        runs=runs,
        pause_s=pause,
        name=name,
        keep=keep,
        warmup_jobs=warmup_jobs,
    )
    try:
        report = run_ab(get_settings(), cfg, typer.echo, out)
    except BenchError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    _finish(report, out)
    for f in report["headline"]:
        fig = report["figures"][f]
        if fig["ratio"] is not None:
            a, b = fig["A"]["median"], fig["B"]["median"]
            typer.echo(f"{f:<40} A {a:>12,.3f}  B {b:>12,.3f}  B/A {fig['ratio']:.3f}")
    if any(r.get("error") for r in report["runs"]):
        raise typer.Exit(1)
