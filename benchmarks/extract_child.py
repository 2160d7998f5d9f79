"""Run one plane extraction in this process and print its timings and memory as JSON.

The benchmark starts this as a child process so that the peak RSS it reports (getrusage's
ru_maxrss, which the kernel tracks for the process: tracemalloc would miss torch's tensors)
belongs to the extraction alone, not to the benchmark's engines and models.

    python -m benchmarks.extract_child MODEL OUT_DIR [--limit N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out_dir")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    import torch

    from rotserve.extract import ExtractConfig, extract_from_loaded
    from rotserve.extract.candidates import HARMFUL, HARMLESS
    from rotserve.hf.generate import load_hf_model
    from rotserve.paths import default_prompts
    from rotserve.prompts import load_prompts

    rss_start = _rss()
    t0 = time.perf_counter()
    model, tokenizer = load_hf_model(args.model, args.dtype)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss()
    prompts = {
        HARMFUL: load_prompts(default_prompts()[HARMFUL], limit=args.limit),
        HARMLESS: load_prompts(default_prompts()[HARMLESS], limit=args.limit),
    }
    cfg = ExtractConfig(
        model=args.model,
        out=f"{args.out_dir}/plane.safetensors",
        batch_size=args.batch_size,
        dtype=args.dtype,
        figure=False,
        progress=False,
    )
    t0 = time.perf_counter()
    result = extract_from_loaded(model, tokenizer, prompts, cfg)
    extract_s = time.perf_counter() - t0
    n = sum(len(v) for v in prompts.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(
        "ROTSERVE_EXTRACT_RESULT "
        + json.dumps(
            {
                "prompts": n,
                "harmful": len(prompts[HARMFUL]),
                "harmless": len(prompts[HARMLESS]),
                "batch_size": args.batch_size,
                "dtype": args.dtype,
                "second": cfg.second,
                "select": cfg.select,
                "holdout": cfg.holdout,
                "threads": torch.get_num_threads(),
                "model_load_s": load_s,
                "extract_s": extract_s,
                "prompts_per_s": n / extract_s,
                "rss_start_bytes": rss_start,
                "rss_after_model_load_bytes": rss_loaded,
                "peak_rss_bytes": peak,
                "chosen_site": result.sites[result.chosen].name
                if result.chosen is not None
                else None,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
