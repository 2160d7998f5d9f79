"""Side-by-side timing: contenders alternate within one process so machine drift cancels.

Every benchmark here compares two (or more) ways of doing the same work. Timing them in
separate runs would fold in whatever else the machine did meanwhile (other jobs, thermal
state, page cache), so contenders run in rounds, A B then B A, and each ratio is the median
of per-round ratios: a slow patch of time slows both members of a round.

On a shared machine a burst of someone else's work can still land on one member of a round
only. So every round also measures the CPU time the rest of the machine used while it ran
(all CPUs' busy time from /proc/stat minus this process tree's own CPU time); a round where
that exceeds `max_external` cores is recorded as discarded and run again, up to `max_retries`
extra rounds. The JSON keeps the discarded rounds and the external load of every round.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Run:
    """One timed call of one contender: wall seconds and the work it did (tokens, bytes...)."""

    seconds: float
    work: float

    @property
    def rate(self) -> float:
        return self.work / self.seconds if self.seconds > 0 else math.nan


@dataclass
class Rounds:
    """Runs per contender, index r of every list being round r (kept rounds only)."""

    runs: dict[str, list[Run]] = field(default_factory=dict)
    external: list[float] = field(default_factory=list)  # other processes' cores, per round
    discarded: list[dict[str, Any]] = field(default_factory=list)

    def rates(self, name: str) -> list[float]:
        return [r.rate for r in self.runs[name]]

    def median_rate(self, name: str) -> float:
        return statistics.median(self.rates(name))

    def median_seconds(self, name: str) -> float:
        return statistics.median(r.seconds for r in self.runs[name])

    def paired_ratios(self, num: str, den: str) -> list[float]:
        """rate(num) / rate(den) per round: the drift-cancelling comparison."""
        return [a.rate / b.rate for a, b in zip(self.runs[num], self.runs[den], strict=True)]

    def ratio(self, num: str, den: str) -> float:
        return statistics.median(self.paired_ratios(num, den))

    def summary(self, name: str) -> dict[str, Any]:
        rates = self.rates(name)
        return {
            "rounds": len(rates),
            "median_rate": statistics.median(rates),
            "min_rate": min(rates),
            "max_rate": max(rates),
            "median_seconds": self.median_seconds(name),
            "work_per_run": self.runs[name][0].work,
            "rates": rates,
        }


class ExternalLoad:
    """CPU cores used by processes outside this process tree since start()."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._busy0 = 0.0
        self._own0 = 0.0

    @staticmethod
    def _busy_seconds() -> float:
        import os

        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return math.nan
        v = [float(x) for x in fields]
        idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
        # guest time is already counted in user/nice
        busy = sum(v[:8]) - idle
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        import psutil

        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._busy0 = self._busy_seconds()
        self._own0 = self._own_seconds()

    def cores(self) -> float:
        """Average cores used by others since start() (NaN where /proc/stat is missing).

        Children that exited in between are not counted as ours, so this errs high.
        """
        wall = time.perf_counter() - self._t0
        if wall <= 0:
            return math.nan
        others = (self._busy_seconds() - self._busy0) - (self._own_seconds() - self._own0)
        return max(others, 0.0) / wall


def alternate(
    contenders: dict[str, Callable[[], float]],
    rounds: int,
    warmup: int = 1,
    on_round: Callable[[int, dict[str, Run], float], None] | None = None,
    settle_s: float = 0.0,
    max_external: float | None = None,
    max_retries: int = 0,
) -> Rounds:
    """Call every contender once per round, reversing the order every other round.

    Each callable does its work and returns the amount (tokens, bytes, ...). Warm-up calls
    (same order rule) are not recorded: first calls pay for lazy allocation and caches.
    settle_s is slept before every timed call, outside the timing: a vLLM worker keeps
    spinning for 1 s after its last request (shm_broadcast busy_loop_s), and on a 2-core
    machine an idle-but-spinning engine would slow the contender that runs next.
    With max_external set, a round during which other processes used more than that many
    cores on average is discarded and repeated, at most max_retries times in all.
    """
    names = list(contenders)
    for w in range(warmup):
        for name in _order(names, w):
            contenders[name]()
    result = Rounds({name: [] for name in names})
    retries = 0
    r = 0
    while len(result.external) < rounds:
        this_round: dict[str, Run] = {}
        load = ExternalLoad()
        load.start()
        for name in _order(names, r):
            if settle_s:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            work = contenders[name]()
            this_round[name] = Run(time.perf_counter() - t0, float(work))
        external = load.cores()
        if on_round is not None:
            on_round(r, this_round, external)
        r += 1
        noisy = max_external is not None and math.isfinite(external) and external > max_external
        if noisy and retries < max_retries:
            retries += 1
            result.discarded.append(
                {"external_cores": external, **{k: v.rate for k, v in this_round.items()}}
            )
            continue
        for name in names:
            result.runs[name].append(this_round[name])
        result.external.append(external)
    return result


def _order(names: Sequence[str], r: int) -> list[str]:
    return list(names) if r % 2 == 0 else list(reversed(names))


def finite_positive(x: object) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0
