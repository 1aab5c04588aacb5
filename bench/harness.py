"""What every benchmark needs around it: the model's latency (set, then always restored), the stack's
state, CPU per stack service, and private helper processes (own router/gateway on an own Redis db).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis.asyncio as aioredis

import view
from contract.settings import REPO_ROOT, Settings
from eco2.infra import redis_argv

from .stats import rss_kib, tree_cpu_s

T = TypeVar("T")


class BenchError(RuntimeError):
    """A benchmark cannot run (stack down, a helper process failed to start...)."""


async def stoppable(coro: Coroutine[Any, Any, T]) -> T:
    """Run a benchmark so that Ctrl-C or SIGTERM cancels it cleanly: its cleanups run (the model's
    latency restored, helper processes stopped) before the process exits."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        raise BenchError(
            "interrupted; cleaned up (model latency restored, helper processes stopped)"
        ) from None
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


# --- the simulated model's latency ---------------------------------------------------------------


def parse_latency(text: str) -> tuple[float, float] | None:
    """ "5,10" -> (5, 10); "0" -> (0, 0); "keep" -> None (leave the model as it is)."""
    if text == "keep":
        return None
    lo, _, hi = text.partition(",")
    a = float(lo)
    b = float(hi) if hi else a
    if a < 0 or b < a:
        raise ValueError(f"bad model latency {text!r}: want MIN[,MAX] seconds with 0 <= MIN <= MAX")
    return a, b


@contextlib.asynccontextmanager
async def model_latency(s: Settings, latency: tuple[float, float] | None) -> AsyncIterator[dict[str, float]]:
    """Set the simulated model's latency for the run and put the previous one back afterwards,
    whatever happens (other engineers' tests rely on it). Yields the latency in force."""
    base = f"http://{s.model_host}:{s.model_port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        before = (await http.get("/admin/latency")).raise_for_status().json()
        if latency is None:
            yield before
            return
        want = {"min_s": latency[0], "max_s": latency[1]}
        (await http.put("/admin/latency", json=want)).raise_for_status()
        try:
            yield want
        finally:
            # Shielded: a Ctrl-C during the run must still restore the model.
            await asyncio.shield(http.put("/admin/latency", json=before))


# --- the stack -----------------------------------------------------------------------------------


async def stack_status(s: Settings) -> dict[str, dict[str, Any]]:
    from eco2 import stack

    return await stack.status(s)


async def require(s: Settings, names: list[str]) -> dict[str, dict[str, Any]]:
    """The stack's status; BenchError naming what is missing or down among `names` (a name also
    means its numbered processes: "kafka" = kafka-1..3 of a three-node stack)."""
    status = await stack_status(s)
    names = [
        m
        for n in names
        for m in ([n] if n in status else [k for k in status if k.startswith(f"{n}-")] or [n])
    ]
    missing = [n for n in names if n not in status]
    down = [n for n in names if n in status and not status[n]["up"]]
    if missing or down:
        parts = []
        if missing:
            parts.append(f"not part of the stack: {', '.join(missing)}")
        if down:
            parts.append(f"down: {', '.join(down)} (run `eco2 stack up`)")
        raise BenchError("; ".join(parts))
    return status


def service_pids(s: Settings) -> dict[str, int]:
    """Pid of every running stack service (Kafka, Redis, Postgres, the app processes)."""
    from eco2 import services, stack

    out: dict[str, int] = {}
    for svc in services.services():
        pid = stack.read_pid(s, svc)
        if pid is not None:
            out[svc.name] = pid
    return out


class ServiceCpu:
    """CPU and memory of each stack service (with its child processes) over a run."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t = time.monotonic()
        self._cpu = tree_cpu_s(pids.values())

    def result(self) -> dict[str, dict[str, float | None]]:
        wall = max(time.monotonic() - self._t, 1e-6)
        now = tree_cpu_s(self.pids.values())
        out: dict[str, dict[str, float | None]] = {}
        for name, pid in self.pids.items():
            used = now.get(pid, 0.0) - self._cpu.get(pid, 0.0)
            rss = rss_kib(pid)
            out[name] = {
                "cpu_s": round(used, 2),
                "avg_pct_of_core": round(100.0 * used / wall, 1),
                "rss_mib": round(rss / 1024, 1) if rss is not None else None,
            }
        return out


def cpu_per_job(services: Mapping[str, Mapping[str, float | None]], jobs: int) -> dict[str, Any]:
    """CPU milliseconds per completed job: all stack processes together and each one (the cost of
    a scan, robust on a shared box where wall-clock figures are not)."""
    if jobs <= 0 or not services:
        return {"jobs": jobs, "total_ms": None, "by_process_ms": {}}
    by = {n: round(1000.0 * float(v["cpu_s"] or 0.0) / jobs, 2) for n, v in services.items()}
    return {
        "jobs": jobs,
        "total_ms": round(sum(by.values()), 2),
        "by_process_ms": dict(sorted(by.items(), key=lambda kv: -kv[1])),
    }


def service_env(pids: dict[str, int]) -> dict[str, dict[str, str]]:
    """The ECO2_* variables each running service was started with (from /proc/PID/environ), so
    a report says e.g. which ECO2_STAGE_CONCURRENCY the workers really ran with."""
    out: dict[str, dict[str, str]] = {}
    for name, pid in pids.items():
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        env = dict(
            item.decode(errors="replace").partition("=")[::2]
            for item in raw.split(b"\0")
            if item.startswith(b"ECO2_")
        )
        if env:
            out[name] = env
    return out


def raise_fd_limit() -> int:
    """Every client is a socket: lift this process's open-files limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# --- private helper processes --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A helper process this benchmark started (and alone stops, by its pid)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"


@contextlib.asynccontextmanager
async def private_redis(s: Settings) -> AsyncIterator[tuple[str, Proc]]:
    """A redis-server of the benchmark's own, configured as the stack's, for the micro-benchmarks:
    pub/sub is server-wide, so on the stack's Redis every synthetic event would also reach the
    stack's gateway (and a load test's events the private gateway). Yields (url, process)."""
    port = free_port()
    d = Path(tempfile.mkdtemp(prefix="eco2-bench-redis-"))
    argv = redis_argv("127.0.0.1", port, d)
    proc = Proc(f"redis-{port}", argv, {}, s.local_dir / "logs" / "bench" / f"redis-{port}.log").start()
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            client = aioredis.from_url(url, socket_connect_timeout=1)
            try:
                if await client.ping():  # type: ignore[misc]
                    # Filled by the benchmark itself, not from the log: whole by definition
                    # (else a private router would first rebuild it and gateways hold streams).
                    await view.mark_ready(client)
                    break
            except (OSError, aioredis.RedisError):
                pass
            finally:
                await client.aclose()
            if not proc.alive() or time.monotonic() > deadline:
                raise BenchError(f"could not start a private redis-server:\n{proc.tail()}")
            await asyncio.sleep(0.05)
        yield url, proc
    finally:
        proc.stop()
        shutil.rmtree(d, ignore_errors=True)


def python_proc(s: Settings, name: str, module_args: list[str], env: dict[str, str]) -> Proc:
    log = s.local_dir / "logs" / "bench" / f"{name}.log"
    return Proc(name, [sys.executable, "-m", *module_args], env, log)


async def wait_http(url: str, proc: Proc, timeout_s: float = 60.0) -> None:
    """Wait until `url` answers 200, failing early if the process died."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise BenchError(f"{proc.name} not ready at {url} after {timeout_s:.0f}s:\n{proc.tail()}")
