"""Benchmarks: rotserve against its baselines, measured side by side in one run.

    python jobs/bench.py [--quick] [--out bench/]

writes bench/bench.json and regenerates BENCHMARKS.md. See benchmarks/sections/ for what is
measured, benchmarks.runner for the order and benchmarks.timing for how (alternating rounds,
paired ratios). A repository
folder, not part of the rotserve wheel: jobs/bench.py and the tests import it from the
checkout.
"""

import importlib
from typing import Any

# Where each re-exported name lives.
_HOMES = {"BenchSettings": "benchmarks.settings", "run_bench": "benchmarks.runner"}
__all__ = ["BenchSettings", "run_bench"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `jobs/bench.py --help` and the benchmark's child processes do not pay
    # for torch and vLLM imports they do not need.
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
