"""Grid throughput: rotserve's one mixed-angle pass against HF generate with hooks and a stock
vLLM engine with hooks (one angle per call), plus the float32 check that they agree."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks.models import ModelShape, model_dir, plane_file
from benchmarks.sections.common import (
    MAX_EXTERNAL_CORES,
    Context,
    bench_instructions,
    even_angles,
    round_logger,
)
from benchmarks.timing import alternate


def run(ctx: Context, engines: dict[str, Any]) -> None:
    import torch

    from benchmarks.engines import HookedVLLMEngine
    from benchmarks.hf_grid import HFGrid
    from benchmarks.roofline import measure_matmul_peak

    s = ctx.settings
    rot = engines["rotserve"]
    shape = s.grid_model
    angles = even_angles(s.grid_angles)
    # The baseline at its best: HF uses every core.
    torch.set_num_threads(os.cpu_count() or 1)
    peak = measure_matmul_peak(shape, seconds=s.roofline_seconds)
    ctx.log(f"grid: {shape.name} MLP matmul peak {peak['peak_tflops']:.3f} TFLOP/s (bfloat16)")
    agreement = check_agreement(ctx, shape, angles) if s.vllm_hooks else None
    hf_grids = (
        [
            HFGrid(model_dir(shape, ctx.models_root), plane_file(shape, ctx.models_root), dtype)
            for dtype in s.hf_dtypes
        ]
        if any(n <= s.hf_max_prompts for n in s.grid_prompts)
        else []
    )
    hooked = None
    hooked_info: dict[str, Any] = {}
    try:
        if s.vllm_hooks:
            ctx.log("starting stock vLLM engine with rotation hooks (eager, in-process)")
            t0 = time.perf_counter()
            hooked = HookedVLLMEngine(
                model_dir(shape, ctx.models_root),
                plane_file(shape, ctx.models_root),
                s.dtype,
                s.max_model_len,
            )
            hooked_info = {
                "start_s": round(time.perf_counter() - t0, 1),
                "dtype": s.dtype,
                "enforce_eager": True,
                "in_process": True,
                "hooked_modules": hooked.num_hooks,
                "sites": list(hooked.sites),
                "torch_threads": torch.get_num_threads(),
                "rotserve_engine": f"{s.dtype}, "
                + ("eager" if s.enforce_eager else "torch.compile (vLLM default)"),
            }
            ctx.log(f"  started in {hooked_info['start_s']} s, {hooked.num_hooks} hooks")
        results = [_grid_one(ctx, rot, hooked, hf_grids, n, angles, peak) for n in s.grid_prompts]
    finally:
        if hooked is not None:
            hooked.close()
    with_hf = [r for r in results if "hf" in r]
    # grid_speedup: the largest prompt count HF ran at, where it batches best (the
    # conservative number); grid_vs_vllm_hooks: the largest prompt count.
    head = with_hf[-1] if with_hf else results[-1]
    ctx.details["grid"] = {
        **head,
        "by_prompts": results,
        "matmul_peak": peak,
        "vllm_hooks_engine": hooked_info,
        "agreement": agreement,
        "vs_vllm_hooks_headline": (
            {"prompts": results[-1]["prompts"], "ratio": results[-1]["speedup_vs_vllm_hooks"]}
            if s.vllm_hooks
            else None
        ),
    }


def _grid_one(
    ctx: Context,
    rot: Any,
    hooked: Any,
    hf_grids: list[Any],
    n: int,
    angles: list[float],
    peak: dict[str, Any],
) -> dict[str, Any]:
    """One prompt count: every contender's grid, alternating in rounds."""
    import torch

    from benchmarks.hf_grid import probe_best
    from benchmarks.roofline import achieved_tflops

    s = ctx.settings
    shape = s.grid_model
    instr = bench_instructions(n)
    grid_instr, grid_angles = _grid_requests(instr, angles)
    contenders: dict[str, Callable[[], float]] = {
        "rotserve": lambda: rot.generate(grid_instr, grid_angles, s.grid_tokens)
    }
    if hooked is not None:
        contenders["vllm_hooks"] = lambda: hooked.grid(instr, angles, s.grid_tokens)
    hf = None
    row: dict[str, Any] = {}
    if n <= s.hf_max_prompts and hf_grids:
        ctx.log(f"grid: {s.grid_angles} angles x {n} prompts x {s.grid_tokens} tokens; HF probe")
        batch_sizes = sorted({min(b, n) for b in s.hf_batch_sizes})
        hf, best_bs, trials = probe_best(hf_grids, instr, s.grid_tokens, batch_sizes, ctx.log)
        contenders["hf"] = lambda: hf.grid(instr, angles, s.grid_tokens, best_bs)
        row.update(
            {
                "hf_probe": trials,
                "hf_best": {"dtype": hf.dtype, "batch_size": best_bs},
                "hf_threads": torch.get_num_threads(),
            }
        )
    else:
        ctx.log(f"grid: {s.grid_angles} angles x {n} prompts x {s.grid_tokens} tokens")
    # One angle's worth of the grid on each vLLM engine first (HF is warm from its probe):
    # a first call at a new batch size pays for allocations that are not the method's cost.
    rot.generate(instr, angles[:1] * n, s.grid_tokens)
    if hooked is not None:
        hooked.grid(instr, angles[:1], s.grid_tokens)
    rounds = alternate(
        contenders,
        s.grid_rounds,
        warmup=0,  # warmed above: a full warm-up round would cost as much as a timed one
        on_round=round_logger(ctx, "grid"),
        settle_s=s.settle_s,
        max_external=MAX_EXTERNAL_CORES,
        max_retries=1,  # an HF grid takes minutes: one re-run at most
    )
    # Tokens each contender pushes through the model per grid: every prompt once per
    # angle (prefix caching is off in the engines) plus every generated token.
    prompt_tokens = sum(rot.prompt_tokens(instr))
    processed = len(angles) * (prompt_tokens + n * s.grid_tokens)
    seconds = {k: rounds.median_seconds(k) for k in contenders}
    achieved = {k: achieved_tflops(processed, t, shape) for k, t in seconds.items()}
    # RotServeEngine.generate applies the chat template on every call (rotserve and the
    # hooked engine both pay it, HF's prompts are templated once): its share of a grid.
    template_s = _chat_template_seconds(rot.tokenizer, grid_instr)
    row.update(
        {
            "model": shape.name,
            "roofline": {
                "tokens_processed_per_grid": processed,
                "achieved_tflops": achieved,
                "share_of_peak": {k: v / peak["peak_tflops"] for k, v in achieved.items()},
                # No engine doing the same matmuls beats the baseline by more than this.
                **(
                    {"speedup_ceiling": peak["peak_tflops"] / achieved["hf"]}
                    if "hf" in achieved
                    else {}
                ),
            },
            "angles": s.grid_angles,
            "prompts": n,
            "max_tokens": s.grid_tokens,
            "tokens_per_grid": s.grid_angles * n * s.grid_tokens,
            "rounds": s.grid_rounds,
            "chat_template_s_per_grid": template_s,
            "chat_template_share": {k: template_s / seconds[k] for k in seconds if k != "hf"},
            **{name: rounds.summary(name) for name in contenders},
            "external_cores_per_round": rounds.external,
            "discarded_rounds": rounds.discarded,
        }
    )
    if "hf" in contenders:
        row["paired_ratios"] = rounds.paired_ratios("rotserve", "hf")
        row["ratio"] = row["speedup"] = rounds.ratio("rotserve", "hf")
    if hooked is not None:
        row["paired_ratios_vs_vllm_hooks"] = rounds.paired_ratios("rotserve", "vllm_hooks")
        row["speedup_vs_vllm_hooks"] = rounds.ratio("rotserve", "vllm_hooks")
    return row


def _grid_requests(instr: list[str], angles: list[float]) -> tuple[list[str], list[float]]:
    """Every (prompt, angle) pair of a grid as one request, angle-major."""
    return [t for _ in angles for t in instr], [a for a in angles for _ in instr]


def check_agreement(ctx: Context, shape: ModelShape, angles: list[float]) -> dict[str, Any]:
    """rotserve and the hooked stock engine must produce the same tokens (float32, short run).

    Float32 because bf16 rounds the rotated activations differently in the two code paths'
    batch layouts; here only float32 accumulation order differs. Fails loudly under
    settings.agreement_min (see BenchSettings for why that threshold).
    """
    from benchmarks.engines import BenchEngine, HookedVLLMEngine

    s = ctx.settings
    model, plane = model_dir(shape, ctx.models_root), plane_file(shape, ctx.models_root)
    instr = bench_instructions(s.agreement_prompts)
    tokens = s.agreement_tokens
    ctx.log(
        f"grid: first-token agreement check, float32, {len(angles)} angles x {len(instr)} "
        f"prompts x {tokens} tokens"
    )
    t0 = time.perf_counter()
    rot = BenchEngine(model, plane, "float32", s.max_model_len, enforce_eager=True)
    try:
        hooked = HookedVLLMEngine(model, plane, "float32", s.max_model_len)
        try:
            ours = rot.completions(*_grid_requests(instr, angles), tokens, logprobs=True)
            theirs = [
                c for a in angles for c in hooked.completions(instr, a, tokens, logprobs=True)
            ]
            plain = hooked.completions(instr, None, tokens, logprobs=True)
            hook_calls = hooked.hooks.calls
        finally:
            hooked.close()
    finally:
        rot.close()
    pairs = len(ours)
    same = [a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True)]
    first = [a.token_ids[0] == b.token_ids[0] for a, b in zip(ours, theirs, strict=True)]
    lp_diff = [
        abs(a.logprobs[0] - b.logprobs[0])
        for a, b, f in zip(ours, theirs, first, strict=True)
        if f and a.logprobs and b.logprobs
    ]
    changed = [c.token_ids != plain[i % len(instr)].token_ids for i, c in enumerate(theirs)]
    res = {
        "dtype": "float32",
        "angles": len(angles),
        "prompts": len(instr),
        "tokens": tokens,
        "pairs": pairs,
        "identical_pairs": sum(same),
        "agreement": sum(same) / pairs,
        "first_token_agreement": sum(first) / pairs,
        "max_first_logprob_diff": max(lp_diff) if lp_diff else None,
        # How many pairs steering changes at all (vs the same engine, hooks passing through):
        # what a broken hook would get wrong, i.e. how much the check can see.
        "steering_changes": sum(changed) / pairs,
        "hook_calls": hook_calls,
        "threshold": s.agreement_min,
        "seconds": time.perf_counter() - t0,
    }
    ctx.log(
        f"  {sum(same)}/{pairs} (prompt, angle) pairs identical over {tokens} tokens, first "
        f"token {res['first_token_agreement']:.3f}, max first-token |logprob diff| "
        f"{res['max_first_logprob_diff']}; steering changes {res['steering_changes']:.2f} of "
        f"pairs; {hook_calls} hook calls"
    )
    if res["agreement"] < s.agreement_min or not any(changed):
        raise RuntimeError(
            f"rotserve and the hooked stock vLLM engine disagree: {sum(same)}/{pairs} pairs "
            f"identical (need {s.agreement_min:.0%}), steering changed "
            f"{sum(changed)}/{pairs} pairs: they do not compute the same steering"
        )
    return res


def _chat_template_seconds(tokenizer: Any, instructions: list[str]) -> float:
    """What RotServeEngine.generate spends applying the chat template to these prompts."""
    from rotserve.prompts import chat_prompt

    t0 = time.perf_counter()
    for t in instructions:
        chat_prompt(tokenizer, t)
    return time.perf_counter() - t0
