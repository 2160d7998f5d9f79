"""Benchmarks: steering overhead, grid throughput, distinct angles, the rotation op, extraction,
coherence and the start-up canary, judging, capability (lm-eval) at every setting.

    python jobs/bench.py            # full run (~30 min on 2 CPU cores)
    python jobs/bench.py --quick    # smaller sizes (~12 min once vLLM's compile cache is warm)
    python jobs/bench.py --quick --only grid --markdown BENCHMARKS.md   # re-measure one section
    python jobs/bench.py --quick --only judge     # the judge row alone (~1 min)
    python jobs/bench.py --quick --only capability   # rotserve capability vs lm-eval via the server

Writes OUT/bench.json and OUT/bench.md (OUT defaults to bench/) and regenerates BENCHMARKS.md
at the repository root, keeping its hand-written interpretation section. The benchmark code
lives in the repository's benchmarks/ folder (not in the rotserve wheel).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a repository folder, not part of the installed package.
sys.path.insert(0, str(ROOT))

from benchmarks.report import SECTION_TITLES  # noqa: E402  (after the sys.path line)

SECTIONS = tuple(SECTION_TITLES)


def wait_for_quiet(max_load: float, max_wait_s: float) -> None:
    """Other jobs on the machine skew every number: wait (bounded) for the load to drop."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = os.getloadavg()[0]
        if load < max_load:
            return
        if time.monotonic() > deadline:
            print(
                f"bench: load {load:.2f} still >= {max_load} after {max_wait_s:.0f} s; "
                "measuring anyway (the JSON records the load)",
                file=sys.stderr,
            )
            return
        print(f"bench: load {load:.2f} >= {max_load}, waiting", file=sys.stderr, flush=True)
        time.sleep(30)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    p.add_argument("--out", type=Path, default=ROOT / "bench", help="JSON/model cache folder")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="Markdown report to regenerate ('-' for none; default BENCHMARKS.md at the repo "
        "root, except with --only; given with --only, an existing report keeps every section "
        "and summary row except those of the benchmarks run)",
    )
    p.add_argument("--models", type=Path, default=None, help="model cache (default OUT/models)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these benchmarks")
    p.add_argument(
        "--wait-load",
        type=float,
        default=None,
        metavar="L",
        help="first wait until the 1-minute load average is below L",
    )
    p.add_argument("--wait-max", type=float, default=2400.0, help="longest wait, seconds")
    args = p.parse_args(argv)

    from benchmarks.runner import run_bench
    from benchmarks.settings import BenchSettings, with_sections

    # SIGTERM (a killed job) must still run the engines' shutdown in run_bench's finally:
    # otherwise the engine processes outlive the benchmark and keep their cores busy.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.wait_load is not None:
        wait_for_quiet(args.wait_load, args.wait_max)
    settings = BenchSettings.quick_settings() if args.quick else BenchSettings.full()
    if args.only:
        settings = with_sections(settings, args.only)
    if args.markdown is None:
        markdown = None if args.only else ROOT / "BENCHMARKS.md"
    else:
        markdown = None if str(args.markdown) == "-" else args.markdown
    run_bench(settings, args.out, markdown, models_root=args.models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
