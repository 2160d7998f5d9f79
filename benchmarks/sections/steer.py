"""Steering overhead: rotserve at a different angle per request against the stock engine."""

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
    instr = bench_instructions(s.steer_requests)
    # A different angle for every request: the case a single-angle engine cannot serve.
    angles = even_angles(s.steer_requests)
    stock, rot = engines["stock"], engines["rotserve"]
    ctx.log(f"steering overhead: {s.steer_requests} requests x {s.steer_tokens} tokens")
    rounds = alternate(
        {
            "rotserve": lambda: rot.generate(instr, angles, s.steer_tokens),
            "stock": lambda: stock.generate(instr, [None] * len(instr), s.steer_tokens),
        },
        s.steer_rounds,
        s.warmup,
        round_logger(ctx, "steer"),
        settle_s=s.settle_s,
        max_external=MAX_EXTERNAL_CORES,
        max_retries=s.steer_rounds,
    )
    lengths = rot.prompt_tokens(instr)
    ctx.details["steer_overhead"] = {
        "requests": s.steer_requests,
        "max_tokens": s.steer_tokens,
        "rounds": s.steer_rounds,
        "layers": s.model.num_layers,
        "sites_per_layer": 2,
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths),
        "angles": "distinct per request: " + f"{angles[0]}..{angles[-1]}",
        **summarise(rounds, "rotserve", "stock"),
    }
