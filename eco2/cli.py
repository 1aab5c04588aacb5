"""`eco2`: the one entry point for operators."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Annotated

import typer

from contract.settings import get_settings

from . import services, stack
from .bench_cli import bench_app
from .bench_cli import chaos as bench_chaos
from .contract_cli import contract
from .db import db_app
from .dlq import dlq_app
from .install import InstallError
from .scan_cli import DEMO_IMAGE, scan
from .state_cli import state_app

app = typer.Typer(help="eco2-streams: the recycling-scan backend on Kafka.", no_args_is_help=True)
stack_app = typer.Typer(help="Run the local stack (Kafka, Redis, Postgres and the app).")
deploy_app = typer.Typer(help="Kubernetes manifests.")
app.add_typer(stack_app, name="stack")
app.command("scan")(scan)
app.command("contract")(contract)
app.add_typer(deploy_app, name="deploy")
app.add_typer(state_app, name="state")
app.add_typer(db_app, name="db")
app.add_typer(dlq_app, name="dlq")
app.add_typer(bench_app, name="bench")
app.command("chaos")(bench_chaos)  # `eco2 chaos` = `eco2 bench chaos`

GroupOpt = Annotated[
    str | None,
    typer.Option("--only", help="comma-separated groups (infra, app) or service names (default: everything)"),
]


def _groups(only: str | None) -> set[str] | None:
    return set(only.split(",")) if only else None


def _fail(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@stack_app.command("up")
def stack_up(only: GroupOpt = None) -> None:
    """Start every service that is not running and wait until each is ready."""
    try:
        asyncio.run(stack.up(get_settings(), _groups(only)))
    except (stack.StackError, InstallError) as exc:
        _fail(str(exc))


@stack_app.command("down")
def stack_down(
    only: GroupOpt = None,
    reset: Annotated[bool, typer.Option("--reset", help="also delete all data")] = False,
) -> None:
    """Stop what `up` started (by pid). Data is kept unless --reset."""
    stack.down(get_settings(), _groups(only), reset=reset)


@stack_app.command("status")
def stack_status(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object for scripts")] = False,
) -> None:
    """Show each service as up or down, with its address."""
    result = asyncio.run(stack.status(get_settings()))
    if as_json:
        print(json.dumps({"services": result}))
        return
    for name, info in result.items():
        mark = typer.style("up  ", fg="green") if info["up"] else typer.style("down", fg="red")
        typer.echo(f"{name:<10} {mark} {info['url']}")


@stack_app.command("logs")
def stack_logs(
    name: Annotated[str, typer.Argument(help="service name")],
    lines: Annotated[int, typer.Option("-n", help="lines to show")] = 50,
    follow: Annotated[bool, typer.Option("-f", "--follow")] = False,
) -> None:
    """Show a service's log."""
    s = get_settings()
    try:
        svc = services.find(name)
    except services.StackError as exc:
        _fail(str(exc))
    path = stack.log_path(s, svc.name)
    if not path.exists():
        _fail(f"no log for {name} at {path}")
    argv = ["tail", f"-n{lines}", *(["-F"] if follow else []), str(path)]
    raise typer.Exit(subprocess.call(argv))


@app.command("capacity")
def capacity(
    rate: Annotated[float, typer.Option("--rate", help="peak scans per second")],
    latency: Annotated[float, typer.Option("--latency", help="mean model seconds per call")] = 7.5,
    rpm: Annotated[float, typer.Option("--rpm", help="model provider's rate limit, requests/min")] = 10_000,
    concurrency: Annotated[int, typer.Option("--concurrency", help="ECO2_STAGE_CONCURRENCY")] = 200,
    threshold: Annotated[int, typer.Option("--threshold", help="stage ScaledObjects' lagThreshold")] = 100,
) -> None:
    """What a scan rate needs: pods, concurrency, KEDA thresholds (docs/operations.md)."""
    from .capacity import plan

    print(json.dumps(plan(rate, latency, rpm, concurrency, threshold).as_dict(), indent=2))


@deploy_app.command("topics")
def deploy_topics() -> None:
    """Regenerate deploy/strimzi/topics.yaml from contract/topics.py."""
    from .topics_yaml import write

    typer.echo(f"wrote {write()}")


@deploy_app.command("manifests")
def deploy_manifests() -> None:
    """Regenerate deploy/app/stages.yaml (stage Deployments, ScaledObjects) and
    deploy/strimzi/users.yaml (KafkaUsers and ACLs) from contract/."""
    from .manifests import write

    for path in write():
        typer.echo(f"wrote {path}")


@deploy_app.command("all")
def deploy_all() -> None:
    """Regenerate every generated manifest: topics, stage workers and scalers, Kafka users."""
    deploy_topics()
    deploy_manifests()


image_app = typer.Typer(help="The container image (buildah, no Docker engine or registry needed).")
app.add_typer(image_app, name="image")


@image_app.command("build")
def image_build(
    base: Annotated[
        str | None, typer.Option("--base", help="base image (default: a local Debian bookworm minbase)")
    ] = None,
) -> None:
    """Build deploy/Dockerfile as localhost/eco2-streams:VERSION from the runtime lock."""
    from . import image

    try:
        typer.echo(f"built {image.build(get_settings(), base)}")
    except (subprocess.CalledProcessError, InstallError) as exc:
        _fail(f"image build failed: {exc}")


@app.command(
    "kafka-tool",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def kafka_tool(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="consumer-groups, topics, get-offsets, acls or configs")],
) -> None:
    """Run one of Kafka's admin tools against ECO2_KAFKA_BOOTSTRAP, e.g.
    `eco2 kafka-tool consumer-groups --describe --group eco2-router` (shows lag)."""
    from .kafka_tools import UnknownTool, run

    try:
        code = run(get_settings(), name, list(ctx.args))
    except (UnknownTool, InstallError) as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command("smoke")
def smoke() -> None:
    """Round-trip one message through Kafka, Redis and Postgres."""
    from .smoke import run

    ok = asyncio.run(run(get_settings(), typer.echo))
    if not ok:
        raise typer.Exit(1)


@app.command("demo")
def demo(
    image_url: Annotated[str, typer.Argument(help="photo URL to scan")] = DEMO_IMAGE,
) -> None:
    """The main job: one real scan through the running stack, stages shown as they happen."""
    s = get_settings()
    status = asyncio.run(stack.status(s))
    down = [name for name, info in status.items() if not info["up"]]
    if down:
        _fail(f"services down: {', '.join(down)}; run `eco2 stack up` first")
    typer.echo(f"scanning {image_url}")
    scan(image_url, user="demo-user", user_input=None, follow="gateway" in status, as_json=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
