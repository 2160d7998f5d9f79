"""What runs inside each Ray actor: a job's Worker, built once from a picklable spec and called
per shard (the shape of a Ray Data predictor class), wrapped by the one actor class."""

from __future__ import annotations

import os
import socket
import time
from abc import ABC, abstractmethod
from typing import Any

import pyarrow as pa

from rotserve.fanout.cluster import Placement, cpu_binding


class Worker(ABC):
    """A job's work in one actor: `__init__(spec)` builds the engine (once; slow), `__call__`
    turns one shard into its Arrow table. The spec is shipped to every actor, so it must be
    small and picklable; the worker itself never leaves its actor."""

    @abstractmethod
    def __init__(self, spec: Any) -> None: ...

    @abstractmethod
    def __call__(self, shard: Any) -> pa.Table: ...

    def info(self) -> dict[str, Any]:
        """What the manifest should record of this worker's engine (e.g. its start-up check)."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Release the engine (vLLM stops its engine-core processes)."""


class EngineActor:
    """One worker in one Ray actor; FanOut makes it a remote class with per-run resources.

    The environment is set before the worker is built, so vLLM (imported then) and its
    engine-core process see it; a CPU engine is pinned to its slot's cores."""

    def __init__(
        self, worker: type[Worker], spec: Any, slot: int, env: dict[str, str], where: Placement
    ) -> None:
        os.environ.update(env)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not where.use_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(
                slot, where.cpus_per_engine, os.cpu_count() or 1
            )
        t0 = time.perf_counter()
        self.worker = worker(spec)
        import ray

        self.info = {
            "slot": slot,
            "node": ray.get_runtime_context().get_node_id(),  # Ray's id: unique per node
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "startup_s": round(time.perf_counter() - t0, 2),
            "cpu_bind": None if where.use_gpu else os.environ["VLLM_CPU_OMP_THREADS_BIND"],
            **self.worker.info(),
        }

    def run_shard(self, shard: Any) -> tuple[str, pa.Table, dict[str, Any]]:
        t0 = time.perf_counter()
        table = self.worker(shard)
        return shard.shard_id, table, {**self.info, "generate_s": time.perf_counter() - t0}

    def close(self) -> None:
        self.worker.close()
