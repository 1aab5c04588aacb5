"""What a benchmark's private redis-server did beside the load, read from its log afterwards: its
AOF rewrites. Each one forks the server, then a child writes the whole dataset to a new base file
while the server goes on (issue 23: delivery stalls of the churn benchmark start at a rewrite's
fork, or while its child competes for the box's cores). Read from the log, not polled: watching
costs the run nothing."""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path

# "21434:M 03 Dec 2026 18:33:25.490 * Starting automatic rewriting of AOF on 101% growth"
_LINE = re.compile(r"^\d+:[MC] (\d\d \w{3} \d{4} \d\d:\d\d:\d\d\.\d{3}) [.\-*#] (.*)$")


@dataclass(frozen=True)
class Rewrite:
    """One AOF rewrite, in wall-clock seconds (Redis logs local time, as this box's clock)."""

    started: float  # the server decided to rewrite (auto or BGREWRITEAOF): from here it is blocked
    forked: float  # the fork returned in the server: the child runs beside it from here
    ended: float | None  # the child exited (None: the log ends first)
    trigger: str  # "auto: 101% growth" or "BGREWRITEAOF"

    def overlaps(self, t0: float, t1: float) -> bool:
        """Whether [t0, t1] meets the rewrite, from its start until its child exited."""
        return t0 <= (self.ended if self.ended is not None else float("inf")) and t1 >= self.started


def _ts(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%d %b %Y %H:%M:%S.%f").timestamp()


def rewrites(text: str) -> list[Rewrite]:
    """The AOF rewrites a redis-server log records, oldest first."""
    out: list[Rewrite] = []
    started: float | None = None
    trigger = "BGREWRITEAOF"
    pending: dict[str, object] | None = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        t, msg = _ts(m.group(1)), m.group(2)
        if msg.startswith("Starting automatic rewriting of AOF"):
            started, trigger = t, "auto: " + msg.rsplit(" on ", 1)[-1]
        elif msg.startswith("Background append only file rewriting started"):
            pending = {"started": started if started is not None else t, "forked": t, "trigger": trigger}
            started, trigger = None, "BGREWRITEAOF"
        elif msg.startswith("Background AOF rewrite terminated") and pending is not None:
            out.append(Rewrite(ended=t, **pending))  # type: ignore[arg-type]
            pending = None
    if pending is not None:
        out.append(Rewrite(ended=None, **pending))  # type: ignore[arg-type]
    return out


def read_rewrites(log: Path | None) -> list[Rewrite]:
    if log is None:
        return []
    try:
        return rewrites(log.read_text(errors="replace"))
    except FileNotFoundError:
        return []
