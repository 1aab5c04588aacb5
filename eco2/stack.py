"""The local stack: one table of processes, each with its command and readiness check.

`up` starts what is not running (idempotent) and waits until each service really answers;
`down` stops only what `up` started, by the pid it recorded; data stays unless `--reset`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from contract.settings import Settings

from . import install
from .probes import port_open, redis_ready
from .service import ReadyCheck, Service, StackError, data_dir, log_dir, log_path, run_dir
from .services import services

# --- process control -------------------------------------------------------------------------


def _pid_path(s: Settings, svc: Service) -> Path:
    if svc.pid_file is not None:
        return svc.pid_file(s)
    return run_dir(s) / f"{svc.name}.pid"


def read_pid(s: Settings, svc: Service) -> int | None:
    path = _pid_path(s, svc)
    try:
        pid = int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listens(pid: int, port: int) -> bool:
    """True when process `pid` itself holds a listening TCP socket on `port` (Linux /proc): with
    SO_REUSEPORT a sibling answering on the port proves nothing about this process."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


def _own_ready(svc: Service, check: ReadyCheck) -> ReadyCheck:
    """`check`, and for a shared port also that this service's own process listens on it."""
    if not svc.shared_port:
        return check

    async def both(s: Settings) -> bool:
        pid = read_pid(s, svc)
        return pid is not None and listens(pid, svc.port(s)) and await check(s)

    return both


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


async def start(s: Settings, svc: Service) -> str:
    """Start one service unless it already runs; wait for readiness. Returns what happened."""
    started = _own_ready(svc, svc.start_ready or svc.ready)
    if read_pid(s, svc) is not None:
        if await started(s):
            return "already up"
        # Running but not ready (e.g. a Kafka node waiting for a restarted peer): wait for it,
        # never start a second copy beside it.
        return await _wait_started(s, svc, started, "was starting")
    port = svc.port(s)
    if read_pid(s, svc) is None and not svc.shared_port and port_open("127.0.0.1", port):
        raise StackError(
            f"{svc.name}: port {port} is in use by a process this stack did not start; "
            f"stop it or set the ECO2_* setting for {svc.name}'s address"
        )
    for d in (run_dir(s), log_dir(s), data_dir(s)):
        d.mkdir(parents=True, exist_ok=True)
    svc.prepare(s)
    log = log_path(s, svc.name)
    env = {**os.environ, **svc.env(s)}
    if svc.daemon:
        proc = subprocess.run(svc.argv(s), capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise StackError(f"{svc.name} failed to start:\n{proc.stdout}{proc.stderr}\n{_tail(log)}")
    else:
        with open(log, "ab") as out:
            child = subprocess.Popen(
                (["nice", "-n", str(svc.nice)] if svc.nice else []) + svc.argv(s),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        _pid_path(s, svc).write_text(f"{child.pid}\n")
    return await _wait_started(s, svc, started, "started")


async def _wait_started(s: Settings, svc: Service, started: ReadyCheck, what: str) -> str:
    log = log_path(s, svc.name)
    deadline = time.monotonic() + svc.timeout_s
    while time.monotonic() < deadline:
        if await started(s):
            if svc.after_ready is not None:
                await svc.after_ready(s)
            return what
        if read_pid(s, svc) is None:
            raise StackError(f"{svc.name} exited during start-up; last log lines:\n{_tail(log)}")
        await asyncio.sleep(0.3)
    raise StackError(f"{svc.name} not ready after {svc.timeout_s:.0f}s; last log lines:\n{_tail(log)}")


def stop(s: Settings, svc: Service, timeout_s: float = 20.0) -> bool:
    """Stop a service this stack started (by its recorded pid). Returns False if it wasn't up."""
    return stop_together(s, [svc], timeout_s)[0]


def stop_together(s: Settings, svcs: list[Service], timeout_s: float = 20.0) -> list[bool]:
    """Signal every service first, then wait for all: Kafka nodes stopped one by one each wait
    for a controller quorum the previous ones took away."""
    pids: list[int | None] = []
    for svc in svcs:
        pid = read_pid(s, svc)
        pids.append(pid)
        if pid is None:
            continue
        if svc.stop_argv is not None:
            subprocess.run(svc.stop_argv(s), capture_output=True)
        else:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p is not None and _alive(p) for p in pids):
        time.sleep(0.1)
    for svc, pid in zip(svcs, pids, strict=True):
        if pid is None:
            if svc.pid_file is None:  # a stale file of a process that died on its own
                _pid_path(s, svc).unlink(missing_ok=True)
            continue
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if svc.pid_file is None:
            _pid_path(s, svc).unlink(missing_ok=True)
    return [pid is not None for pid in pids]


def _strays(s: Settings, table: list[Service], groups: set[str] | None) -> list[Service]:
    """Processes `up` started under another layout (e.g. kafka-1..3 after ECO2_KAFKA_NODES went
    back to 1, or workers-3 after fewer workers): `down` stops them too, by their pid files."""
    known = {svc.name for svc in table}
    out: list[Service] = []
    for pid_file in sorted(run_dir(s).glob("*.pid")):
        name = pid_file.stem
        head, _, tail = name.rpartition("-")
        base = head if tail.isdigit() else name
        group = "infra" if base == "kafka" else "app"
        if name in known or (groups is not None and not {name, base, group} & groups):
            continue
        out.append(
            Service(name=name, url=lambda s: "", ready=redis_ready, argv=lambda s: [], port=lambda s: 0)
        )
    return out


async def status(s: Settings, groups: set[str] | None = None) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for svc in services(groups, s):
        up = read_pid(s, svc) is not None and await _own_ready(svc, svc.ready)(s)
        out[svc.name] = {"url": svc.url(s), "up": up}
    return out


async def up(s: Settings, groups: set[str] | None = None, echo: Callable[[str], None] = print) -> None:
    install.ensure_apt_packages()
    for svc in services(groups, s):
        t0 = time.monotonic()
        what = await start(s, svc)
        echo(f"{svc.name:<10} {what:<11} {svc.url(s)}  ({time.monotonic() - t0:.1f}s)")


def _stray_note(svc: Service, strays: list[Service]) -> str:
    return " (not in this layout)" if svc in strays else ""


def down(
    s: Settings, groups: set[str] | None = None, reset: bool = False, echo: Callable[[str], None] = print
) -> None:
    table = services(groups, s)
    strays = _strays(s, table, groups)
    rest = [svc for svc in reversed(table) if "kafka" not in svc.groups]
    rest += [svc for svc in strays if not svc.name.startswith("kafka")]
    for svc in rest:
        echo(f"{svc.name:<10} {'stopped' if stop(s, svc) else 'was not running'}{_stray_note(svc, strays)}")
    nodes = [svc for svc in table if "kafka" in svc.groups] + [
        svc for svc in strays if svc.name.startswith("kafka")
    ]
    for svc, was_up in zip(nodes, stop_together(s, nodes), strict=True):
        echo(f"{svc.name:<10} {'stopped' if was_up else 'was not running'}{_stray_note(svc, strays)}")
    if reset:
        shutil.rmtree(data_dir(s), ignore_errors=True)
        echo(f"removed {data_dir(s)}")
