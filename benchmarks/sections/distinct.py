"""Distinct angles do not cost: one batch at every angle against the same batch at one angle."""

from __future__ import annotations

from typing import Any

from benchmarks.sections.common import (
    MAX_EXTERNAL_CORES,
    Context,
    bench_instructions,
    even_angles,
    round_logger,
    summarise,
)
from benchmarks.timing import alternate


def run(ctx: Context, engines: dict[str, Any]) -> None:
    s = ctx.settings
    rot = engines["rotserve"]
    n = s.distinct_requests
    instr = bench_instructions(n)
    ctx.log(f"distinct angles: {n} requests x {s.distinct_tokens} tokens")
    rounds = alternate(
        {
            "distinct": lambda: rot.generate(instr, even_angles(n), s.distinct_tokens),
            "shared": lambda: rot.generate(instr, [s.shared_angle] * n, s.distinct_tokens),
        },
        s.distinct_rounds,
        s.warmup,
        round_logger(ctx, "distinct"),
        settle_s=s.settle_s,
        max_external=MAX_EXTERNAL_CORES,
        max_retries=s.distinct_rounds,
    )
    ctx.details["distinct_angles"] = {
        "requests": n,
        "max_tokens": s.distinct_tokens,
        "rounds": s.distinct_rounds,
        "shared_angle": s.shared_angle,
        **summarise(rounds, "distinct", "shared"),
    }
