"""`eco2 bench ab --base REF [--runs N] -- <bench args>`: one benchmark, base ref (A) against the
working tree (B), alternating A B A B ... on this box.

The stack's processes are what a benchmark measures, so each run brings a fresh private stack up
from its side's checkout (`python -m eco2.cli stack up` with that checkout as the working
directory: `-m` puts it first on sys.path, and every process the stack starts inherits it), runs
`eco2 bench <args>` from the same checkout, and takes that stack down again (`--reset`), so only
one stack of the two is ever on the box. Each side gets its own loopback port block and
`ECO2_LOCAL_DIR` (bench/cluster.py's `private_env`, Kafka's jars symlinked), so neither touches
the checkout's own stack (`.eco2.env`) nor the other engineers' stacks. The other settings of this
checkout's `.eco2.env` (e.g. `ECO2_STAGE_CONCURRENCY`) and the caller's ECO2_* variables go to both.

REF is checked out with `git worktree add --detach` into a temporary directory. When its
`requirements-dev.lock` is this checkout's, it runs on this venv's interpreter (the packages are
the same, the code comes from its checkout); otherwise it gets its own venv from its lock (pip's
cache makes that a minute, not ten).

`--warmup-jobs N` runs `eco2 bench pipeline --jobs N` (zero-latency model, its report thrown away)
on each run's fresh stack before the measured benchmark, the same on both sides: a freshly started
Kafka broker spends much of its first minutes' CPU in the JIT compilers (a one-off a long-running
broker has long paid), which every run would otherwise count as per-scan cost. At 300 VUs 3,000
jobs (~1 min a side) took the broker from 17-19 to 10-11 ms per job, the compiler threads from
10-12% to 3-4% of a core (bench/reports/issue19-broker/README.md); 1,000 removed half of it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from contract.settings import REPO_ROOT, Settings
from eco2 import install

from . import ab_report, boxref
from .cluster import free_block, private_env
from .harness import BenchError
from .stats import machine

# Bench commands that run against the stack and write one report; the others (suite, table, ab,
# peer, scaleout) make several reports or their own stacks.
COMMANDS = ("load", "pipeline", "router", "fanout", "soak", "chaos")
LOCK = "requirements-dev.lock"


@dataclass
class AbConfig:
    base: str
    bench_args: list[str]
    runs: int = 3
    pause_s: float = 10.0
    name: str = ""
    keep: bool = False  # keep the temporary worktree, local dirs and logs (debugging)
    run_timeout_s: float = 4 * 3600.0
    stack_timeout_s: float = 600.0
    warmup_jobs: int = 0  # jobs of an untimed `bench pipeline` on each fresh stack before the run


@dataclass
class Side:
    """One side of the comparison: a checkout and the interpreter that runs its code."""

    label: str
    ref: str  # commit sha
    root: Path
    python: str
    port_base: int
    env: dict[str, str] = field(default_factory=dict)


def _git(*args: str, cwd: Path = REPO_ROOT) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def check_args(bench_args: list[str]) -> None:
    if not bench_args or bench_args[0] not in COMMANDS:
        raise BenchError(
            f"after `--` give one of the bench commands {', '.join(COMMANDS)} and its options, "
            "e.g. `eco2 bench ab --base main -- load --mode sse --vus 300`"
        )
    if "--out" in bench_args:
        raise BenchError("leave out --out: ab gives every run its own report directory")


def shared_env(root: Path = REPO_ROOT) -> dict[str, str]:
    """ECO2_* settings both sides run with: this checkout's `.eco2.env`, then the caller's env
    (ports, URLs and ECO2_LOCAL_DIR are each side's own and set afterwards)."""
    env = {
        k: v for k, v in dotenv_values(root / ".eco2.env").items() if k.startswith("ECO2_") and v is not None
    }
    env.update({k: v for k, v in os.environ.items() if k.startswith("ECO2_")})
    return env


def same_lock(base_root: Path, root: Path = REPO_ROOT) -> bool:
    a, b = base_root / LOCK, root / LOCK
    return a.exists() and b.exists() and a.read_bytes() == b.read_bytes()


def base_python(base_root: Path, tmp: Path, echo: Callable[[str], None]) -> tuple[str, str]:
    """(interpreter, how) for the base checkout: this venv's when the locks agree, else a new one."""
    if same_lock(base_root):
        return sys.executable, f"this venv's interpreter ({LOCK} identical), code from its checkout"
    venv = tmp / "venv"
    echo(f"ab: {LOCK} differs: installing the base's into {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    proc = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--require-hashes",
            "-r",
            str(base_root / LOCK),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BenchError(f"installing the base's {LOCK} failed:\n{proc.stderr[-2000:]}")
    return python, f"its own venv from its {LOCK}"


def side_env(side: Side, local_dir: Path, shared: dict[str, str]) -> dict[str, str]:
    """The environment of every command of one run: private ports and local dir over the shared
    settings; PYTHONPATH names the side's checkout (cwd does it for `-m`, this for anything else)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECO2_")}
    env.update(shared)
    env.update(private_env(side.port_base, local_dir))
    env["PYTHONPATH"] = str(side.root)
    env.pop("VIRTUAL_ENV", None)
    return env


def _eco2(side: Side, env: dict[str, str], args: list[str], log: Path, timeout: float) -> int:
    with log.open("a") as out:
        out.write(f"\n$ eco2 {' '.join(args)}\n")
        out.flush()
        try:
            proc = subprocess.run(
                [side.python, "-m", "eco2.cli", *args],
                cwd=side.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            out.write(f"\n(timed out after {timeout:.0f} s)\n")
            return -1
    return proc.returncode


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _local_dir(tmp: Path, label: str, kafka_home: Path) -> Path:
    local = tmp / f"{label}-local"
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    os.chmod(local, 0o755)  # Postgres runs as its own user when we are root
    if kafka_home.exists():
        (local / kafka_home.name).symlink_to(kafka_home)
    seed_cluster_id(local)
    return local


def seed_cluster_id(local: Path) -> str:
    """Write the Kafka cluster id both sides' `stack up` will read (`data/kafka/cluster.id`).

    Older checkouts (140ab8c, issue 19's base) pass a random id to Kafka's storage tool as a
    separate argument, and an id starting with `-` (about 1 in 64) is taken for an option: that
    side's stack never starts. An id without a leading `-` works on every checkout."""
    cluster_id = "-"
    while cluster_id.startswith("-"):
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    path = local / "data" / "kafka" / "cluster.id"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cluster_id)
    return cluster_id


def warmup_args(cfg: AbConfig, out: Path) -> list[str]:
    """The untimed warm-up's eco2 arguments (its report goes to a scratch directory)."""
    return ["bench", "pipeline", "--jobs", str(cfg.warmup_jobs), "--name", "warmup", "--out", str(out)]


def one_run(
    cfg: AbConfig,
    side: Side,
    index: int,
    tmp: Path,
    shared: dict[str, str],
    kafka_home: Path,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Box reference, fresh stack up, the benchmark, stack down: one run's record."""
    label = f"{side.label}{index}"
    out_dir = tmp / "runs" / label
    out_dir.mkdir(parents=True)
    log = tmp / "runs" / f"{label}.log"
    local = _local_dir(tmp, side.label, kafka_home)
    env = side_env(side, local, shared)
    run: dict[str, Any] = {"side": side.label, "index": index, "ref": side.ref}
    echo(f"ab: {label}: box reference ...")
    run["box_ref"] = boxref.measure()
    t0 = time.monotonic()
    try:
        echo(f"ab: {label}: stack up from {side.root} (ports {side.port_base}+)")
        if _eco2(side, env, ["stack", "up"], log, cfg.stack_timeout_s) != 0:
            run["error"] = f"stack up failed: {_tail(log)}"
            return run
        if cfg.warmup_jobs:
            echo(f"ab: {label}: warm-up, eco2 bench pipeline --jobs {cfg.warmup_jobs}")
            w0 = time.monotonic()
            (tmp / "warmup" / label).mkdir(parents=True, exist_ok=True)
            rc = _eco2(side, env, warmup_args(cfg, tmp / "warmup" / label), log, cfg.stack_timeout_s)
            run["warmup"] = {
                "jobs": cfg.warmup_jobs,
                "returncode": rc,
                "seconds": round(time.monotonic() - w0, 1),
            }
            if rc != 0:
                run["error"] = f"warm-up failed (exit {rc}): {_tail(log)}"
                return run
        echo(f"ab: {label}: eco2 bench {' '.join(cfg.bench_args)}")
        rc = _eco2(side, env, ["bench", *cfg.bench_args, "--out", str(out_dir)], log, cfg.run_timeout_s)
        run["returncode"] = rc
    finally:
        _eco2(side, env, ["stack", "down", "--reset"], log, cfg.stack_timeout_s)
        run["seconds"] = round(time.monotonic() - t0, 1)
        if not cfg.keep:
            shutil.rmtree(local, ignore_errors=True)
    reports = sorted(out_dir.glob("*.json"))
    if not reports:
        run["error"] = f"the benchmark wrote no report (exit {rc}): {_tail(log)}"
        return run
    rep = json.loads(reports[-1].read_text())
    run["report_file"] = f"{label}/{reports[-1].name}"
    run["report_name"] = rep.get("name")
    run["figures"] = ab_report.figures(rep, run["box_ref"])
    if rc not in (0, 2):  # 2: a chaos run with a MISS, still a measurement
        run["error"] = f"exit {rc}: {_tail(log, 5)}"
    return run


def sides(cfg: AbConfig, tmp: Path, echo: Callable[[str], None]) -> tuple[Side, Side, str]:
    """Check REF out (A) beside the working tree (B); returns both and how A's Python is made."""
    sha = _git("rev-parse", "--verify", f"{cfg.base}^{{commit}}")
    base_root = tmp / "base"
    _git("worktree", "add", "--detach", str(base_root), sha)
    python, how = base_python(base_root, tmp, echo)
    a = Side("A", sha, base_root, python, free_block())
    b = Side("B", _git("rev-parse", "HEAD"), REPO_ROOT, sys.executable, free_block())
    while b.port_base == a.port_base:
        b.port_base = free_block()
    return a, b, how


def run_ab(
    s: Settings, cfg: AbConfig, echo: Callable[[str], None] = print, out: Path | None = None
) -> dict[str, Any]:
    """Run the comparison; returns the ab report (per-run reports and logs copied beside it)."""
    from .report import REPORTS_DIR

    check_args(cfg.bench_args)
    if cfg.runs < 1:
        raise BenchError("--runs must be at least 1")
    if cfg.warmup_jobs < 0:
        raise BenchError("--warmup-jobs must be 0 (none) or more")
    kafka_home = install.ensure_kafka(s)
    tmp = Path(tempfile.mkdtemp(prefix="eco2-ab-"))
    os.chmod(tmp, 0o755)
    started = time.time()
    runs: list[dict[str, Any]] = []
    a = None
    try:
        a, b, how = sides(cfg, tmp, echo)
        shared = shared_env()
        box = boxref.measure()
        plan = ab_report.order(cfg.runs)
        for k, (label, i) in enumerate(plan):
            if k:
                time.sleep(cfg.pause_s)  # let the box settle after the previous stack went down
            run = one_run(cfg, a if label == "A" else b, i, tmp, shared, kafka_home, echo)
            runs.append(run)
            echo(f"ab: {label}{i}: " + (run.get("error") or f"done in {run['seconds']} s"))
        config = {
            "base_ref": cfg.base,
            "base_sha": a.ref,
            "head_sha": b.ref,
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "runs": cfg.runs,
            "bench_args": ["bench", *cfg.bench_args],
            "order": plan,
            "pause_s": cfg.pause_s,
            "warmup_jobs": cfg.warmup_jobs,
            "base_env": how,
            "shared_env": {k: v for k, v in shared.items() if "PASSWORD" not in k and "KEY" not in k},
            "name": cfg.name,
        }
        report = ab_report.build(config, runs, started, machine(), box)
        dest = (
            out or REPORTS_DIR
        ) / f"{report['name']}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"
        shutil.copytree(tmp / "runs", dest, dirs_exist_ok=True)
        report["runs_dir"] = dest.name
        return report
    finally:
        if a is not None and not cfg.keep:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(a.root)], cwd=REPO_ROOT, capture_output=True
            )
        if cfg.keep:
            echo(f"ab: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=REPO_ROOT, capture_output=True)
