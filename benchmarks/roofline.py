"""How close each grid contender comes to this machine's matmul peak, and what that allows.

Why: the grid speedup is rotserve's time over the HF baseline's for the same work. Both run the
same matmuls (every token of every prompt and reply goes through every linear layer once), so
no engine can beat the baseline by more than (the machine's matmul peak) / (the baseline's
achieved rate). Measuring that ceiling in the same run says whether a missed target is left on
the table or is a property of the machine.

FLOPs per token count the linear layers and the LM head (2 x multiply-adds); attention scores
and norms are left out, which at these context lengths (< 100 tokens) is a few percent and
makes every achieved rate an underestimate by the same factor for both contenders.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.models import ModelShape


def linear_flops_per_token(shape: ModelShape) -> int:
    """2 x the multiply-adds of every linear layer and the LM head for one token."""
    return 2 * shape.linear_weights()


def measure_matmul_peak(
    shape: ModelShape,
    dtype: torch.dtype = torch.bfloat16,
    rows: tuple[int, ...] = (64, 256, 1024),
    seconds: float = 1.0,
) -> dict[str, Any]:
    """Best TFLOP/s of the shape's MLP matmuls (gate/up then down) over row counts.

    The MLP holds ~85% of a decoder's linear FLOPs, so its best rate is the rate a perfect
    engine would run the whole model at. Each row count runs for about `seconds`.
    """
    h, m = shape.hidden_size, shape.intermediate_size
    g = torch.Generator().manual_seed(0)
    w_up = torch.randn(2 * m, h, generator=g).to(dtype)
    w_down = torch.randn(h, m, generator=g).to(dtype)
    by_rows: dict[int, float] = {}
    for n in rows:
        x = torch.randn(n, h, generator=g).to(dtype)
        flops = 2 * n * (2 * m * h + h * m)

        def step(x: torch.Tensor = x) -> torch.Tensor:
            up = torch.nn.functional.linear(x, w_up)
            return torch.nn.functional.linear(up[:, :m], w_down)

        step()  # warm-up: first call picks kernels and allocates
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            calls += 1
        by_rows[n] = flops * calls / (time.perf_counter() - t0) / 1e12
    best = max(by_rows, key=by_rows.__getitem__)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "tflops_by_rows": by_rows,
        "peak_tflops": by_rows[best],
        "peak_rows": best,
    }


def achieved_tflops(tokens_processed: int, seconds: float, shape: ModelShape) -> float:
    """Linear-layer TFLOP/s of a run that pushed tokens_processed tokens through the model."""
    return tokens_processed * linear_flops_per_token(shape) / seconds / 1e12
