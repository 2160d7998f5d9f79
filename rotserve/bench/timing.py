"""Side-by-side timing: contenders alternate within one process so machine drift cancels.

Every benchmark here compares two (or more) ways of doing the same work. Timing them in
separate runs would fold in whatever else the machine did meanwhile (other jobs, thermal
state, page cache), so contenders run in rounds, A B then B A, and each ratio is the median
of per-round ratios: a slow patch of time slows both members of a round.
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
    """Runs per contender, index r of every list being round r."""

    runs: dict[str, list[Run]] = field(default_factory=dict)

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


def alternate(
    contenders: dict[str, Callable[[], float]],
    rounds: int,
    warmup: int = 1,
    on_round: Callable[[int, dict[str, Run]], None] | None = None,
    settle_s: float = 0.0,
) -> Rounds:
    """Call every contender once per round, reversing the order every other round.

    Each callable does its work and returns the amount (tokens, bytes, ...). Warm-up calls
    (same order rule) are not recorded: first calls pay for lazy allocation and caches.
    settle_s is slept before every timed call, outside the timing: a vLLM worker keeps
    spinning for 1 s after its last request (shm_broadcast busy_loop_s), and on a 2-core
    machine an idle-but-spinning engine would slow the contender that runs next.
    """
    names = list(contenders)
    for w in range(warmup):
        for name in _order(names, w):
            contenders[name]()
    result = Rounds({name: [] for name in names})
    for r in range(rounds):
        this_round: dict[str, Run] = {}
        for name in _order(names, r):
            if settle_s:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            work = contenders[name]()
            this_round[name] = Run(time.perf_counter() - t0, float(work))
        for name in names:
            result.runs[name].append(this_round[name])
        if on_round is not None:
            on_round(r, this_round)
    return result


def _order(names: Sequence[str], r: int) -> list[str]:
    return list(names) if r % 2 == 0 else list(reversed(names))


def finite_positive(x: float) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0
