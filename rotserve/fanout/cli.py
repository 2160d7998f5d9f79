"""The command-line side every fan-out command shares: the "where to run" flags and exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from rotserve.cli import non_negative_int, positive_int
from rotserve.fanout.errors import ExecutionConfigError, FanOutError
from rotserve.fanout.options import ExecutionOptions
from rotserve.rundir import RunDirError


def add_execution_args(p: argparse.ArgumentParser) -> None:
    """The "where to run" options, with ExecutionOptions' defaults."""
    d = ExecutionOptions()
    r = p.add_argument_group("where to run")
    r.add_argument(
        "--engines",
        type=positive_int("--engines"),
        default=None,
        help="vLLM engines (one Ray actor each) (default: one per GPU in the cluster; on CPU, "
        "one per --cpus-per-engine cores, leaving one core for the driver and Ray)",
    )
    r.add_argument(
        "--gpus-per-engine",
        type=non_negative_int("--gpus-per-engine"),
        default=None,
        help="GPUs per engine; 0 = CPU engines (default: 1 if the Ray cluster has GPUs, else 0)",
    )
    r.add_argument(
        "--cpus-per-engine",
        type=positive_int("--cpus-per-engine"),
        default=d.cpus_per_engine,
        help="cores per CPU engine (pinned with VLLM_CPU_OMP_THREADS_BIND)",
    )
    r.add_argument(
        "--tensor-parallel-size",
        type=positive_int("--tensor-parallel-size"),
        default=None,
        help="tensor parallel degree inside one engine (default: --gpus-per-engine)",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join, e.g. auto or ray://head:10001 (default: start a local cluster)",
    )
    r.add_argument(
        "--max-engine-failures",
        type=non_negative_int("--max-engine-failures"),
        default=d.max_engine_failures,
        help="engine (actor) deaths to survive by re-queueing their shards on a fresh engine",
    )
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    r.add_argument("--verbose", action="store_true", help="show Ray and vLLM logs")


def execution_from_args(args: argparse.Namespace) -> ExecutionOptions:
    """The add_execution_args options as ExecutionOptions."""
    return ExecutionOptions(
        engines=args.engines,
        gpus_per_engine=args.gpus_per_engine,
        cpus_per_engine=args.cpus_per_engine,
        tensor_parallel_size=args.tensor_parallel_size,
        ray_address=args.ray_address,
        max_engine_failures=args.max_engine_failures,
        progress=args.progress,
        verbose=args.verbose,
    )


def run_guarded(
    name: str, job: Callable[[], Any], config_errors: tuple[type[Exception], ...] = ()
) -> tuple[Any, int]:
    """(result, 0), or (None, exit status) with one line on stderr: 2 for a bad request, 1 for
    a failed run (finished parts kept), 130 for Ctrl-C."""
    try:
        return job(), 0
    except (ExecutionConfigError, RunDirError, *config_errors) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return None, 2
    except FanOutError as e:
        print(
            f"{name}: failed: {e}\nfinished parts are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return None, 1
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return None, 130
