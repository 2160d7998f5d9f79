"""Benchmarks: rotserve against its baselines, measured side by side in one run.

    python jobs/bench.py [--quick] [--out bench/]

writes bench/bench.json and regenerates BENCHMARKS.md. See rotserve.bench.runner for what is
measured and rotserve.bench.timing for how (alternating rounds, paired ratios).
"""

from rotserve.bench.runner import BenchSettings, run_bench

__all__ = ["BenchSettings", "run_bench"]
