"""Where a JVM's CPU goes, for profiling the Kafka broker (issue 19).

`python -m bench.broker_cpu threads PID SECONDS`: CPU of each thread group over a window, from
/proc/PID/task/*/stat (names with their numbers folded: `data-plane-kafka-request-handler-N`,
`C2 CompilerThreN`, `GC Thread#N`), in % of one core. JFR samples only threads running Java code;
this also sees the JIT compilers and the GC, which JFR does not.

`python -m bench.broker_cpu jfr FILE.jfr [N]`: the N hottest top frames and the threads of a JFR
recording's `jdk.ExecutionSample` events (`jcmd PID JFR.start duration=60s filename=F
settings=profile`), read with the JDK's `jfr print --json`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

_DIGITS = re.compile(r"\d+")


def thread_group(name: str) -> str:
    """A thread's name without its numbers: one line per pool (C1/C2 compilers and G1 kept apart)."""
    name = name.strip()
    prefix = name[:3] if name[:3] in ("C1 ", "C2 ", "G1 ") else ""
    return prefix + _DIGITS.sub("N", name[len(prefix) :])


def java_names(pid: int) -> dict[str, str]:
    """Thread id -> the JVM's full thread name (`jcmd PID Thread.print`; /proc keeps 15 chars)."""
    try:
        proc = subprocess.run(["jcmd", str(pid), "Thread.print"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names: dict[str, str] = {}
    for m in re.finditer(r'^"(.+?)".*? nid=(0x[0-9a-f]+)', proc.stdout, re.M):
        names[str(int(m.group(2), 16))] = m.group(1)
    return names


def _ticks(pid: int, names: dict[str, str] | None = None) -> dict[str, int]:
    """utime + stime jiffies of every thread, by thread id and name."""
    names = names or {}
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = names.get(tid) or raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[f"{tid}:{name}"] = int(fields[11]) + int(fields[12])
    return out


def thread_cpu(pid: int, seconds: float) -> dict[str, float]:
    """% of one core per thread group over `seconds` (threads born in the window count whole)."""
    hz = os.sysconf("SC_CLK_TCK")
    names = java_names(pid)
    before = _ticks(pid, names)
    time.sleep(seconds)
    after = _ticks(pid, names)
    groups: Counter[str] = Counter()
    for key, ticks in after.items():
        groups[thread_group(key.split(":", 1)[1])] += ticks - before.get(key, 0)
    return {g: round(100.0 * t / hz / seconds, 2) for g, t in groups.most_common() if t}


def top_frames(events: list[dict[str, Any]], n: int = 25) -> dict[str, Any]:
    """Counts of the top frame (`Class.method`) and of the sampled thread's group."""
    frames: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for e in events:
        v = e.get("values", e)
        stack = (v.get("stackTrace") or {}).get("frames") or []
        if stack:
            m = stack[0]["method"]
            frames[f"{m['type']['name']}.{m['name']}"] += 1
        thread = (v.get("sampledThread") or {}).get("javaName") or "?"
        threads[thread_group(thread)] += 1
    total = sum(threads.values())
    return {
        "samples": total,
        "top_frames": frames.most_common(n),
        "threads": threads.most_common(n),
    }


def read_jfr(path: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["jfr", "print", "--json", "--events", "jdk.ExecutionSample", path],
        capture_output=True,
        text=True,
        check=True,
    )
    return list(json.loads(proc.stdout)["recording"]["events"])


def main(argv: list[str]) -> None:
    if argv[:1] == ["threads"]:
        for g, pct in thread_cpu(int(argv[1]), float(argv[2])).items():
            print(f"{pct:7.2f}%  {g}")
    elif argv[:1] == ["jfr"]:
        agg = top_frames(read_jfr(argv[1]), int(argv[2]) if len(argv) > 2 else 25)
        total = agg["samples"] or 1
        print(f"{agg['samples']} samples\n-- top frames")
        for name, c in agg["top_frames"]:
            print(f"{100 * c / total:6.1f}%  {c:6d}  {name}")
        print("-- threads")
        for name, c in agg["threads"]:
            print(f"{100 * c / total:6.1f}%  {c:6d}  {name}")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
