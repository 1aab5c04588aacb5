"""Percentiles and CPU/memory readings: the numbers every benchmark reports the same way."""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import resource
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (as k6 and numpy do)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """n, mean, p50, p90, p95, p99 and max of a sample (None when empty)."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    xs = sorted(values)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "n": len(xs),
        "mean": r(sum(xs) / len(xs)),
        "p50": r(percentile(xs, 50)),
        "p90": r(percentile(xs, 90)),
        "p95": r(percentile(xs, 95)),
        "p99": r(percentile(xs, 99)),
        "max": r(xs[-1]),
    }


# --- CPU and memory ------------------------------------------------------------------------------


def self_cpu_s() -> float:
    """CPU seconds (user + system) this process has used."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def box_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])
    return total - idle, total


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, cpu seconds) of a process, None when it is gone. Includes the children it has
    reaped (cutime/cstime): a child's CPU (Redis' BGSAVE fork, an exited Postgres backend) moves
    there when it exits, so a tree's total never drops."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw.rsplit(") ", 1)[1].split()
    return int(rest[1]), sum(int(x) for x in rest[11:15]) / CLK_TCK


def tree_cpu_s(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each pid plus all its live descendants (Postgres backends, uvicorn children)."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                table[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, float] = {}
    for root in pids:
        total, stack = 0.0, [root]
        while stack:
            p = stack.pop()
            if p in table:
                total += table[p][1]
            stack.extend(children.get(p, ()))
        out[root] = total
    return out


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process in KiB (VmRSS), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuMeter:
    """This process's and the machine's CPU between consecutive `tick()`s, in % of one core."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self._t = time.monotonic()
        self._self = self_cpu_s()
        self._box = box_cpu()
        self.start_self = self._self
        self.start_t = self._t

    def tick(self) -> tuple[float, float]:
        """(generator %, whole machine %) since the previous tick; 100% = one core busy."""
        t, me, box = time.monotonic(), self_cpu_s(), box_cpu()
        dt = max(t - self._t, 1e-6)
        gen = 100.0 * (me - self._self) / dt
        busy, total = box[0] - self._box[0], box[1] - self._box[1]
        machine = 100.0 * self.cores * busy / total if total > 0 else 0.0
        self._t, self._self, self._box = t, me, box
        return round(gen, 1), round(machine, 1)

    def total(self) -> dict[str, float]:
        """The generator's CPU over the whole run: seconds and average % of one core."""
        used = self_cpu_s() - self.start_self
        wall = max(time.monotonic() - self.start_t, 1e-6)
        return {"cpu_s": round(used, 2), "avg_pct_of_core": round(100.0 * used / wall, 1)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def quiet_gc() -> None:
    """Keep the generator's garbage collector from pausing it mid-run: objects alive now (the setup)
    are never scanned again, and full collections come rarely (the run allocates many small objects
    that live until the report)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


class GcPauses:
    """This process's garbage collections while installed: (wall-clock start, seconds, generation)
    each, so a stall seen by the generator can be told from its own collection (and their CPU
    time: on a busy box a collection's wall time includes waiting for a core)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self.cpu_s: list[float] = []
        self._t0 = self._cpu0 = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0, self._cpu0 = time.perf_counter(), time.thread_time()
        else:
            took = time.perf_counter() - self._t0
            self.pauses.append((time.time() - took, took, info.get("generation", -1)))
            self.cpu_s.append(time.thread_time() - self._cpu0)

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def during(self, t0: float, t1: float) -> float:
        """Seconds of collection overlapping [t0, t1] (wall clock)."""
        return sum(max(0.0, min(t1, s + d) - max(t0, s)) for s, d, _ in self.pauses)

    def summary_ms(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for gen in sorted({g for _, _, g in self.pauses}):
            took = [d * 1000 for _, d, g in self.pauses if g == gen]
            cpu = [c * 1000 for (_, _, g), c in zip(self.pauses, self.cpu_s, strict=True) if g == gen]
            out[str(gen)] = {
                "count": len(took),
                "ms": round(sum(took), 1),
                "max_ms": round(max(took), 1),
                "cpu_ms": round(sum(cpu), 1),
                "max_cpu_ms": round(max(cpu), 1),
            }
        return out


class LoopLag:
    """How late this process's event loop wakes up: when it is busy, every latency the generator
    measures is inflated by up to this much, so reports show it beside them."""

    INTERVAL_S = 0.05

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.woke: list[float] = []  # wall-clock time of each sample's wake-up (beside `lags`)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.INTERVAL_S)
            self.lags.append(max(time.monotonic() - t - self.INTERVAL_S, 0.0))
            self.woke.append(time.time())

    def late_at(self, t0: float, t1: float) -> float:
        """The longest lag (s) of a wake-up due within [t0, t1] (wall clock): how long this loop
        was held up around that span."""
        return max(
            (lag for lag, woke in zip(self.lags, self.woke, strict=True) if t0 <= woke - lag <= t1),
            default=0.0,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def since(self, start: int) -> tuple[int, float | None]:
        """(next start index, max lag in ms) of the samples after index `start`."""
        part = self.lags[start:]
        return len(self.lags), (round(max(part) * 1000, 1) if part else None)

    def summary_ms(self) -> dict[str, Any]:
        return summary([x * 1000 for x in self.lags], 2)
