"""A trivial fan-out job for the fan-out's own tests: each shard's table is its row numbers.

Its worker starts in a blink and can be told to fail at start, raise on one shard, or die
(os._exit, as an OOM kill would) while holding its k-th shard, so every guarantee of
rotserve.fanout is checked on a real Ray cluster without a model. `main` is its command line,
for the test that SIGKILLs a whole job.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from rotserve.fanout import ExecutionOptions, Job, PartStore, Placement, Worker, run_attempt

SCHEMA = pa.schema([("shard", pa.string()), ("row", pa.int64()), ("value", pa.int64())])


@dataclass(frozen=True)
class CountShard:
    index: int
    n_rows: int

    @property
    def shard_id(self) -> str:
        return f"{self.index:05d}"


@dataclass(frozen=True)
class CountPlan:
    shards: tuple[CountShard, ...]

    @property
    def n_rows(self) -> int:
        return sum(s.n_rows for s in self.shards)

    def shard(self, shard_id: str) -> CountShard:
        return self.shards[int(shard_id)]


def count_plan(n_shards: int, rows_per_shard: int = 3) -> CountPlan:
    return CountPlan(tuple(CountShard(i, rows_per_shard) for i in range(n_shards)))


@dataclass
class CountStore(PartStore):
    schema: ClassVar[pa.Schema] = SCHEMA
    writer: ClassVar[str] = "count job"
    root: Path
    _lock_fd: int | None = None

    @property
    def parts_dir(self) -> Path:
        return self.root / "parts"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "_tmp"

    @classmethod
    def open(cls, root: Path) -> tuple[CountStore, str, dict[str, Any]]:
        store = cls(root=root)
        previous = (
            json.loads(store.manifest_path.read_text()) if store.manifest_path.is_file() else None
        )
        store._prepare()
        manifest = {"attempts": list((previous or {}).get("attempts", []))}
        return store, "resume" if previous else "new", manifest


@dataclass(frozen=True)
class CountSpec:
    fail_init: bool = False
    poison: str | None = None  # a shard id whose every run raises
    die_at: int | None = None  # the first engine exits while it holds its die_at-th shard
    marker: str | None = None  # created by the one engine that dies
    starts: str | None = None  # each engine start appends a line here
    seconds_per_shard: float = 0.0


class CountWorker(Worker):
    def __init__(self, spec: CountSpec) -> None:
        if spec.starts:
            with open(spec.starts, "a") as f:
                f.write(f"{os.getpid()}\n")
        if spec.fail_init:
            raise RuntimeError("cannot load model: config.json is broken")
        self.spec, self.calls = spec, 0

    def __call__(self, shard: CountShard) -> pa.Table:
        self.calls += 1
        if self.spec.die_at == self.calls and self._claim():
            os._exit(1)
        if shard.shard_id == self.spec.poison:
            raise ValueError(f"cannot tokenize shard {shard.shard_id}")
        time.sleep(self.spec.seconds_per_shard)
        rows = range(shard.n_rows)
        return pa.table(
            {
                "shard": [shard.shard_id] * shard.n_rows,
                "row": list(rows),
                "value": [shard.index * 1000 + r for r in rows],
            },
            schema=SCHEMA,
        )

    def _claim(self) -> bool:
        """Only one engine ever dies: the first to create the marker (atomic O_EXCL)."""
        try:
            os.close(os.open(str(self.spec.marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def close(self) -> None:
        pass


def run_count_job(root: Path, plan: CountPlan, spec: CountSpec, options: ExecutionOptions) -> Any:
    store, state, manifest = CountStore.open(root)
    try:

        def worker_spec(where: Placement) -> CountSpec:
            return spec

        job = Job(
            name="count",
            actor_prefix=f"count-{os.getpid()}",
            plan=plan,
            store=store,
            worker=CountWorker,
            worker_spec=worker_spec,
            options=options,
            headline=f"count job: {len(plan.shards)} shards -> {store.parts_dir}",
        )
        return run_attempt(job, manifest, state, time.perf_counter())
    finally:
        store.close()


def main(argv: list[str]) -> int:
    """`count_job.py OUT N_SHARDS SECONDS_PER_SHARD`: the count job on one local engine."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out, n, seconds = Path(argv[0]), int(argv[1]), float(argv[2])
    options = ExecutionOptions(engines=1, progress=False)
    run_count_job(out, count_plan(n), CountSpec(seconds_per_shard=seconds), options)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
