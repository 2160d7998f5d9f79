"""Where a fan-out runs: engines, their GPUs or cores, the Ray cluster, how many deaths to survive.

None of it changes a row or a verdict, so it never enters a run id: a run can be resumed with
more engines, on another cluster, or without a progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass

from rotserve.fanout.errors import ExecutionConfigError


@dataclass(frozen=True)
class ExecutionOptions:
    """The "where to run" settings every fan-out job (grid, judge) shares."""

    engines: int | None = None  # None: one per GPU; on CPU (cores - 1) // cpus_per_engine
    gpus_per_engine: int | None = None  # None: 1 if the cluster has GPUs, else 0 (CPU engines)
    cpus_per_engine: int = 1
    tensor_parallel_size: int | None = None  # None: gpus_per_engine (or 1)
    ray_address: str | None = None  # None: start a local cluster; "auto": join the running one
    max_engine_failures: int = 3  # engine deaths tolerated (shards re-queued) before giving up
    progress: bool = True
    verbose: bool = False  # stream engine (vLLM) and Ray logs to the console

    def check(self) -> None:
        """ExecutionConfigError naming the flag of the first value that cannot work."""
        checks = [
            (
                self.engines is None or self.engines >= 1,
                f"--engines must be at least 1, got {self.engines}",
            ),
            (
                self.gpus_per_engine is None or self.gpus_per_engine >= 0,
                f"--gpus-per-engine must be >= 0, got {self.gpus_per_engine}",
            ),
            (
                self.cpus_per_engine >= 1,
                f"--cpus-per-engine must be at least 1, got {self.cpus_per_engine}",
            ),
            (
                self.tensor_parallel_size is None or self.tensor_parallel_size >= 1,
                f"--tensor-parallel-size must be at least 1, got {self.tensor_parallel_size}",
            ),
            (
                self.max_engine_failures >= 0,
                f"--max-engine-failures must be >= 0, got {self.max_engine_failures}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ExecutionConfigError(message)
