"""Many planes and layer windows in one batch cost nothing extra: mixed / shared, in one run.

One RotServeEngine holding 8 planes. Every round times the same requests twice, alternating
the order: "mixed", each request with its own (plane, window, angle) from 8 planes x 4 windows
x 36 angles, all in one generate call; and "shared", every request at one setting (the first
plane, every layer, one angle). Both steer every token at every steered norm they cover, run
the same token counts (ignore_eos, fixed max_tokens) and have prefix caching off, so the
ratio of their token rates says what mixing costs. The engine's op reads each token's plane
by index and gates each norm per token, so the target is >= 0.97.

Then the op's cost per steered site inside one compiled graph with K = 1 and K = 8 planes
loaded (benchmarks.rotation_op.measure_planes_in_graph), against the single-plane op.

    python -m benchmarks.planes                       # small: tiny model, 288 requests
    python -m benchmarks.planes --shape qwen2.5-0.5b-shaped --requests 1152 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.models import QWEN25_05B, SMALL, TINY, model_dir
from benchmarks.timing import alternate

SHAPES = {s.name: s for s in (TINY, SMALL, QWEN25_05B)}
N_PLANES = 8
ANGLES = [float(a) for a in range(0, 360, 10)]


def windows(num_layers: int) -> list[str]:
    """4 windows: every layer, the first half, the second half, the middle third."""
    half, third = num_layers // 2, max(num_layers // 3, 1)
    return ["all", f"0:{max(half, 1)}", f"{half}:", f"{third}:{max(2 * third, third + 1)}"]


def plane_files(hidden: int, folder: Path) -> dict[str, Path]:
    from rotserve.plane import random_plane

    return {
        f"p{k}": random_plane(hidden, 100 + k).save(folder / f"p{k}.safetensors")
        for k in range(N_PLANES)
    }


def measure_mixed_vs_shared(
    shape_name: str = TINY.name,
    requests: int = 288,
    tokens: int = 8,
    rounds: int = 3,
    root: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    from rotserve.engine import RotServeEngine

    shape = SHAPES[shape_name]
    root = root or Path(tempfile.mkdtemp(prefix="rotserve-planes-bench-"))
    model = model_dir(shape, root)
    planes = plane_files(shape.hidden_size, root)
    wins = windows(shape.num_layers)
    combos = [(p, w, a) for p in planes for w in wins for a in ANGLES]
    # Spread the requests over every combination (all of them once requests >= 1152).
    picked = [combos[(i * 7919) % len(combos)] for i in range(requests)]
    instructions = [f"Tell me about item number {i}." for i in range(requests)]
    log(
        f"planes bench: {shape.name}, {requests} requests x {tokens} tokens, "
        f"{len({c for c in picked})} distinct (plane, window, angle) of {len(combos)}"
    )
    engine = RotServeEngine(
        model,
        planes=planes,
        dtype="bfloat16",
        enable_prefix_caching=False,
        max_model_len=512,
        seed=0,
    )
    try:

        def run(plane: list[str], layers: list[str], angles: list[float]) -> float:
            out = engine.generate(
                instructions,
                angles,
                plane=plane,
                layers=layers,
                max_tokens=tokens,
                temperature=0.0,
                ignore_eos=True,
            )
            return float(sum(c.output_tokens for c in out))

        mixed = ([c[0] for c in picked], [c[1] for c in picked], [c[2] for c in picked])
        shared = (["p0"] * requests, ["all"] * requests, [ANGLES[9]] * requests)
        result = alternate(
            {"mixed": lambda: run(*mixed), "shared": lambda: run(*shared)},
            rounds,
            warmup=1,
            on_round=lambda r, runs, ext: log(
                f"  round {r}: "
                + ", ".join(f"{k} {v.rate:.1f} tok/s" for k, v in runs.items())
                + f" (other processes: {ext:.2f} cores)"
            ),
        )
    finally:
        engine.close()
    return {
        "shape": shape.name,
        "requests": requests,
        "max_tokens": tokens,
        "rounds": rounds,
        "planes": N_PLANES,
        "windows": wins,
        "angles": len(ANGLES),
        "distinct_settings": len(set(picked)),
        "mixed": result.summary("mixed"),
        "shared": result.summary("shared"),
        "paired_ratios": result.paired_ratios("mixed", "shared"),
        "ratio": result.ratio("mixed", "shared"),
        "external_cores_per_round": result.external,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shape",
        choices=list(SHAPES),
        default=TINY.name,
        help="model shape (default: %(default)s)",
    )
    p.add_argument(
        "--requests", type=int, default=288, help="requests per call (default: %(default)s)"
    )
    p.add_argument(
        "--tokens", type=int, default=8, help="tokens per request (default: %(default)s)"
    )
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (default: %(default)s)")
    p.add_argument(
        "--op-tokens",
        type=int,
        nargs="*",
        default=[64, 1024],
        help="op bench token counts (default: %(default)s)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="write the JSON here (default: stdout only)"
    )
    args = p.parse_args(argv)

    from benchmarks.rotation_op import measure_planes_in_graph

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    doc = {
        "mixed_vs_shared": measure_mixed_vs_shared(
            args.shape, args.requests, args.tokens, args.rounds, log=log
        ),
        "op_in_graph": measure_planes_in_graph(
            args.op_tokens, SHAPES[args.shape].hidden_size, 24, torch.bfloat16, 5, 0.1, log
        )
        if args.op_tokens
        else [],
    }
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    ratio = doc["mixed_vs_shared"]["ratio"]
    print(f"mixed / shared token rate: {ratio:.3f} (target >= 0.97)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
