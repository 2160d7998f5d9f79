"""The reference-tool way of producing an angle grid: HF generate with hooks, one pass per angle.

Reference tools steer through forward hooks on a transformers model and take one angle per
batch, so a 36-angle grid is 36 generate passes over the prompts. HFRotatedGenerator could mix
angles in one batch (rotserve's own oracle does), but that is not how the reference tools run;
the comparison is against what they do, at their best: the batch size and dtype that give the
highest throughput on this machine are chosen by a probe before the timed rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class HFGrid:
    """One HFRotatedGenerator that always generates exactly max_new_tokens (no early EOS)."""

    def __init__(self, model: Path, plane: Path, dtype: str) -> None:
        from rotserve.hf.generate import HFRotatedGenerator
        from rotserve.prompts import chat_prompt

        self.dtype = dtype
        self.gen = HFRotatedGenerator(model, plane, dtype=dtype)
        # Random weights emit EOS at random; with no EOS configured, generate runs to
        # max_new_tokens and HFRotatedGenerator trims nothing, like ignore_eos in vLLM.
        self.gen.model.generation_config.eos_token_id = None
        self._chat = chat_prompt
        self._prompts: dict[str, str] = {}

    def prompts(self, instructions: Sequence[str]) -> list[str]:
        for t in instructions:
            if t not in self._prompts:
                self._prompts[t] = self._chat(self.gen.tokenizer, t)
        return [self._prompts[t] for t in instructions]

    def one_angle(
        self, instructions: Sequence[str], angle: float, max_new_tokens: int, batch_size: int
    ) -> int:
        prompts = self.prompts(instructions)
        out = self.gen.generate(
            prompts, [angle] * len(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        lengths = [len(g.token_ids) for g in out]
        if set(lengths) != {max_new_tokens}:
            raise RuntimeError(f"HF generated lengths {sorted(set(lengths))}, not {max_new_tokens}")
        return sum(lengths)

    def grid(
        self,
        instructions: Sequence[str],
        angles: Sequence[float],
        max_new_tokens: int,
        batch_size: int,
    ) -> int:
        """One generate pass per angle over all instructions; returns output tokens."""
        return sum(self.one_angle(instructions, a, max_new_tokens, batch_size) for a in angles)


def probe_best(
    grids: Sequence[HFGrid],
    instructions: Sequence[str],
    max_new_tokens: int,
    batch_sizes: Sequence[int],
    log: Callable[[str], None] = print,
) -> tuple[HFGrid, int, list[dict[str, Any]]]:
    """Time one angle's pass for every (dtype, batch size); return the fastest setting."""
    trials: list[dict[str, Any]] = []
    best: tuple[float, HFGrid, int] | None = None
    for grid in grids:
        grid.one_angle(instructions[:1], 0.0, 2, 1)  # warm-up: first call allocates
        for bs in batch_sizes:
            t0 = time.perf_counter()
            tokens = grid.one_angle(instructions, 30.0, max_new_tokens, bs)
            rate = tokens / (time.perf_counter() - t0)
            trials.append({"dtype": grid.dtype, "batch_size": bs, "tokens_per_s": rate})
            log(f"  HF probe {grid.dtype} batch {bs}: {rate:.1f} tok/s")
            if best is None or rate > best[0]:
                best = (rate, grid, bs)
    assert best is not None
    return best[1], best[2], trials
