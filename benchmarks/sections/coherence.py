"""Coherence scoring's cost against generation alone, and the start-up canary's time."""

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
    """What the grid's default coherence columns cost a shard, and what the canary costs."""
    import statistics

    from rotserve.canary import llm_executor, run_canary

    s = ctx.settings
    rot = engines["rotserve"]
    n = s.distinct_requests
    instr, angles = bench_instructions(n), even_angles(n)
    ctx.log(f"coherence: {n} requests x {s.coherence_tokens} tokens, with and without scoring")

    def with_coherence() -> int:
        out = rot.completions(instr, angles, s.coherence_tokens)
        rot.engine.continuation_logprobs(
            [c.prompt_token_ids for c in out], [c.token_ids for c in out]
        )
        return sum(c.output_tokens for c in out)

    rounds = alternate(
        {
            "with_coherence": with_coherence,
            "generation": lambda: rot.generate(instr, angles, s.coherence_tokens),
        },
        s.distinct_rounds,
        s.warmup,
        round_logger(ctx, "coherence"),
        settle_s=s.settle_s,
        max_external=MAX_EXTERNAL_CORES,
        max_retries=s.distinct_rounds,
    )
    engine = rot.engine
    canary = [
        run_canary(llm_executor(engine.llm), engine.vllm_config) for _ in range(s.canary_runs)
    ]
    assert all(c.ok for c in canary), [c.failures() for c in canary]
    seconds = [c.seconds for c in canary]
    ctx.details["coherence"] = {
        "requests": n,
        "max_tokens": s.coherence_tokens,
        "rounds": s.distinct_rounds,
        **summarise(rounds, "with_coherence", "generation"),
        "canary_runs": len(seconds),
        "canary_s": statistics.median(seconds),
        "canary_max_s": max(seconds),
        "engine_start_s": ctx.details.get("engines", {}).get("start_s", {}).get("rotserve"),
    }
