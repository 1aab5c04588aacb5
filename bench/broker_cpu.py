"""Where a JVM's CPU goes, for profiling the Kafka broker (issue 19).

`python -m bench.broker_cpu threads PID SECONDS`: CPU of each thread group over a window, from
/proc/PID/task/*/stat (names with their numbers folded: `data-plane-kafka-request-handler-N`,
`C2 CompilerThreN`, `GC Thread#N`), in % of one core. JFR samples only threads running Java code;
this also sees the JIT compilers and the GC, which JFR does not.

`python -m bench.broker_cpu requests PID SECONDS`: requests per second and handler ("local") ms per
second of each API key, from the broker's own `kafka.network:type=RequestMetrics` (a JMX agent is
started in the broker on 127.0.0.1:ECO2X_JMX_PORT, default 10119, read with Kafka's JmxTool).

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


_METRIC = re.compile(
    r"kafka\.network:type=RequestMetrics,name=(\w+),request=(\w+)(?:,version=(\d+))?:(\w+)=([-\d.E+]+)"
)


def request_totals(text: str) -> dict[str, dict[str, float]]:
    """Per API key: requests and total local (handler) ms so far, from JmxTool's properties output
    (LocalTimeMs' Mean is over the broker's life, so count x mean is the exact total)."""
    raw: dict[tuple[str, str, str], dict[str, float]] = {}
    for m in _METRIC.finditer(text):
        name, req, ver, attr, value = m.groups()
        raw.setdefault((name, req, ver), {})[attr] = float(value)
    out: dict[str, dict[str, float]] = {}
    for (name, req, _), attrs in raw.items():
        row = out.setdefault(req, {"requests": 0.0, "local_ms": 0.0})
        if name == "RequestsPerSec":
            row["requests"] += attrs.get("Count", 0.0)
        elif name == "LocalTimeMs":
            row["local_ms"] += attrs.get("Count", 0.0) * attrs.get("Mean", 0.0)
    return out


def _jmx_snapshot(port: int) -> str:
    from contract.settings import get_settings
    from eco2 import install

    libs = install.kafka_home(get_settings()) / "libs" / "*"
    names = ("RequestsPerSec", "LocalTimeMs")
    argv = ["java", "-Xmx128m", "-XX:TieredStopAtLevel=1", "-cp", str(libs), "org.apache.kafka.tools.JmxTool"]
    argv += ["--jmx-url", f"service:jmx:rmi:///jndi/rmi://127.0.0.1:{port}/jmxrmi", "--one-time", "true"]
    argv += ["--attributes", "Count,Mean", "--report-format", "properties"]
    for n in names:
        argv += ["--object-name", f"kafka.network:type=RequestMetrics,name={n},*"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout


def request_rates(pid: int, seconds: float) -> dict[str, dict[str, float]]:
    """Per API key over `seconds`: requests/s and local ms/s (Fetch also counts as FetchConsumer)."""
    port = int(os.environ.get("ECO2X_JMX_PORT", "10119"))
    subprocess.run(
        ["jcmd", str(pid), "ManagementAgent.start", f"jmxremote.port={port}", "jmxremote.authenticate=false"]
        + ["jmxremote.ssl=false", "jmxremote.host=127.0.0.1"],
        capture_output=True,
        timeout=30,
    )  # fails harmlessly when the agent already runs
    t0, before = time.monotonic(), request_totals(_jmx_snapshot(port))
    time.sleep(seconds)
    after = request_totals(_jmx_snapshot(port))
    dt = time.monotonic() - t0
    rates = {
        req: {k: round((v - before.get(req, {}).get(k, 0.0)) / dt, 2) for k, v in row.items()}
        for req, row in after.items()
    }
    return dict(
        sorted(((r, v) for r, v in rates.items() if v["requests"] > 0), key=lambda kv: -kv[1]["requests"])
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["threads"]:
        for g, pct in thread_cpu(int(argv[1]), float(argv[2])).items():
            print(f"{pct:7.2f}%  {g}")
    elif argv[:1] == ["requests"]:
        print(f"{'request':<32}{'per s':>9}{'local ms/s':>12}")
        for req, r in request_rates(int(argv[1]), float(argv[2])).items():
            print(f"{req:<32}{r['requests']:9.2f}{r['local_ms']:12.2f}")
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
