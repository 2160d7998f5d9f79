"""Benchmarks: rotserve against its baselines, measured side by side in one run.

    python jobs/bench.py [--quick] [--out bench/]

writes bench/bench.json and regenerates BENCHMARKS.md. See benchmarks.runner for what is
measured and benchmarks.timing for how (alternating rounds, paired ratios). A repository
folder, not part of the rotserve wheel: jobs/bench.py and the tests import it from the
checkout.
"""

from typing import Any

__all__ = ["BenchSettings", "run_bench"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `jobs/bench.py --help` and the benchmark's child processes do not pay
    # for torch and vLLM imports they do not need.
    if name in __all__:
        from benchmarks import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
