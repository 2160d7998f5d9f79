"""What every benchmark section shares: the run's Context, its prompts and angles, and how
a section's alternating rounds are logged and summarised."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.settings import BenchSettings
from benchmarks.timing import Rounds

# A round during which other processes used more than this many cores is run again.
MAX_EXTERNAL_CORES = 0.3


@dataclass
class Context:
    settings: BenchSettings
    models_root: Path
    log: Callable[[str], None]
    details: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)


def bench_instructions(n: int) -> list[str]:
    """n instructions from data/prompts (harmful and harmless interleaved), repeated if short."""
    from rotserve.paths import default_prompts
    from rotserve.prompts import load_prompts

    shipped = default_prompts()
    harmful = [p.instruction for p in load_prompts(shipped["harmful"])]
    harmless = [p.instruction for p in load_prompts(shipped["harmless"])]
    mixed = [x for pair in zip(harmful, harmless, strict=False) for x in pair]
    return [mixed[i % len(mixed)] for i in range(n)]


def even_angles(n: int) -> list[float]:
    """n evenly spaced angles in [0, 360): 36 -> every 10 deg, 72 -> every 5 deg."""
    return [round(360.0 * i / n, 6) for i in range(n)]


def round_logger(ctx: Context, label: str) -> Callable[[int, dict[str, Any], float], None]:
    def on_round(r: int, runs: dict[str, Any], external: float) -> None:
        noisy = " (discarded: busy machine)" if external > MAX_EXTERNAL_CORES else ""
        ctx.log(
            f"  {label} round {r + 1}: "
            + ", ".join(f"{k} {v.rate:.1f}/s ({v.seconds:.1f} s)" for k, v in runs.items())
            + f"; other processes {external:.2f} cores{noisy}"
        )

    return on_round


def summarise(rounds: Rounds, num: str, den: str) -> dict[str, Any]:
    return {
        num: rounds.summary(num),
        den: rounds.summary(den),
        "paired_ratios": rounds.paired_ratios(num, den),
        "ratio": rounds.ratio(num, den),
        "external_cores_per_round": rounds.external,
        "discarded_rounds": rounds.discarded,
    }
