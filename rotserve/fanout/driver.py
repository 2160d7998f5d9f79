"""The driver loop: keep every engine actor busy with pending shards, publish each result once.

A shard is the unit of work and of output: its table becomes one part file named by its
deterministic id, written by the driver alone. A dead engine's shards go back to the front of
the queue and a replacement takes its slot; a late duplicate of a shard already on disk is
dropped. Why Ray core actors and not Ray Data: docs/DESIGN.md.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from rotserve.fanout.cluster import Placement, root_cause
from rotserve.fanout.errors import FanOutError
from rotserve.fanout.worker import EngineActor, Worker

# Shards queued per engine: one generating, one waiting, so an engine never idles while the
# driver receives and writes the previous shard.
DEPTH = 2
# A shard whose engine raised (not died) this many times is a bug, not bad luck: stop.
MAX_SHARD_ERRORS = 2


class Plan(Protocol):
    """A job's plan as the fan-out needs it: its shards, each knowing its id and row count."""

    @property
    def shards(self) -> tuple[Any, ...]: ...

    @property
    def n_rows(self) -> int: ...

    def shard(self, shard_id: str) -> Any: ...


class PartWriter(Protocol):
    def write_part(self, shard_id: str, table: pa.Table) -> Any: ...


@dataclass
class FanOutStats:
    engines: int = 0
    engine_failures: int = 0
    shards_written: int = 0
    rows_written: int = 0
    requeued: list[str] = field(default_factory=list)
    duplicates_dropped: int = 0
    engine_info: list[dict[str, Any]] = field(default_factory=list)
    part_origin: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard -> its engine
    first_row_s: float | None = None  # engines started .. first part on disk (~ engine startup)
    first_part_rows: int = 0
    wall_s: float = 0.0


@dataclass
class FanOut:
    """Keeps `where.engines` actors busy with pending shards and writes each result once.

    `name` prefixes the actors' Ray names (e.g. rotserve-grid-<run id>); each actor builds a
    `worker(spec)`; `store.write_part` publishes a shard's table.
    """

    plan: Plan
    pending_ids: list[str]
    store: PartWriter
    worker: type[Worker]
    spec: Any
    where: Placement
    env: dict[str, str]
    name: str
    max_engine_failures: int
    on_rows: Callable[[int, FanOutStats], None] | None = None  # progress hook
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)
    stats: FanOutStats = field(default_factory=FanOutStats)

    def __post_init__(self) -> None:
        import ray

        self._ray = ray
        self._actors: dict[int, Any] = {}
        self._assigned: dict[int, list[Any]] = {}
        self._inflight: dict[Any, tuple[int, Any]] = {}
        self._pending: deque[Any] = deque(self.plan.shard(i) for i in self.pending_ids)
        self._done: set[str] = set()
        self._shard_errors: dict[str, int] = {}
        self._ever_ready = False
        self._generation = 0
        self._up: set[int] = set()  # slots whose current engine has returned a shard
        self._remote = ray.remote(EngineActor)

    # Actors: one per slot; a replacement takes the slot (and so the CPU cores) of the dead one.
    def _start(self, slot: int) -> None:
        # Named, so an operator (or a test) can find and kill a given engine with ray.get_actor.
        self._generation += 1
        name = f"{self.name}-engine{slot}-{self._generation}"
        self._actors[slot] = self._remote.options(name=name, **self.where.actor_options()).remote(
            self.worker, self.spec, slot, self.env, self.where
        )
        self._assigned[slot] = []
        self._up.discard(slot)

    def _fill(self) -> None:
        for slot, actor in self._actors.items():
            while self._pending and len(self._assigned[slot]) < DEPTH:
                shard = self._pending.popleft()
                ref = actor.run_shard.remote(shard)
                self._inflight[ref] = (slot, shard)
                self._assigned[slot].append(ref)

    def _retry(self, shard: Any, slot: int, err: BaseException, init_failed: bool) -> None:
        self._pending.appendleft(shard)
        self.stats.requeued.append(shard.shard_id)
        self._engine_lost(slot, err, init_failed)

    def _engine_lost(self, slot: int, err: BaseException, init_failed: bool) -> None:
        """Re-queue the slot's shards (front of the queue) and replace its engine, within budget."""
        actor = self._actors.pop(slot)
        for ref in self._assigned.pop(slot):
            _, shard = self._inflight.pop(ref, (slot, None))
            if shard is not None and shard.shard_id not in self._done:
                self._pending.appendleft(shard)
                self.stats.requeued.append(shard.shard_id)
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
        self.stats.engine_failures += 1
        reason = root_cause(err)
        if init_failed and not self._ever_ready:
            raise FanOutError(f"the engine failed to start: {reason}\n\n{err}") from None
        if self.stats.engine_failures > self.max_engine_failures:
            raise FanOutError(
                f"{self.stats.engine_failures} engine failures (limit {self.max_engine_failures}, "
                f"--max-engine-failures); last: {reason}"
            ) from None
        self.log(f"engine {slot} lost ({reason}); re-queued its shards, starting a replacement")
        self._start(slot)

    def run(self) -> FanOutStats:
        ray = self._ray
        from ray.exceptions import (
            NodeDiedError,
            ObjectLostError,
            RayActorError,
            RayTaskError,
            WorkerCrashedError,
        )

        t0 = time.perf_counter()
        self.stats.engines = self.where.engines
        for slot in range(self.where.engines):
            self._start(slot)
        try:
            while self._pending or self._inflight:
                self._fill()
                if not self._inflight:
                    raise FanOutError("no engine left to run the remaining shards")
                ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref not in self._inflight:  # dropped with its dead engine
                        continue
                    slot, shard = self._inflight.pop(ref)
                    self._assigned[slot].remove(ref)
                    try:
                        shard_id, table, info = ray.get(ref)
                    except RayActorError as e:  # the actor died: killed, OOM, node lost
                        self._retry(shard, slot, e, getattr(e, "actor_init_failed", False))
                        continue
                    except (ObjectLostError, WorkerCrashedError, NodeDiedError) as e:
                        self._retry(shard, slot, e, False)
                        continue
                    except RayTaskError as e:
                        # The engine raised: a dead vLLM engine core (replace it and retry) or a
                        # bug that will raise again (give up after MAX_SHARD_ERRORS tries).
                        n = self._shard_errors.get(shard.shard_id, 0) + 1
                        self._shard_errors[shard.shard_id] = n
                        if n >= MAX_SHARD_ERRORS:
                            raise FanOutError(
                                f"shard {shard.shard_id} failed {n} times: {root_cause(e)}\n\n{e}"
                            ) from None
                        self._retry(shard, slot, e, False)
                        continue
                    assert shard_id == shard.shard_id, (shard_id, shard.shard_id)
                    self._ever_ready = True
                    self._up.add(slot)
                    self._written(shard_id, table, info, t0)
        finally:
            self.stats.wall_s = time.perf_counter() - t0
            self.shutdown()
        return self.stats

    def _written(self, shard_id: str, table: pa.Table, info: dict[str, Any], t0: float) -> None:
        if shard_id in self._done:  # a late duplicate of a re-queued shard: already on disk
            self.stats.duplicates_dropped += 1
            return
        expected = self.plan.shard(shard_id).n_rows
        if table.num_rows != expected:
            raise FanOutError(
                f"shard {shard_id} came back with {table.num_rows} rows, expected {expected}"
            )
        self.store.write_part(shard_id, table)
        self._done.add(shard_id)
        self.stats.shards_written += 1
        self.stats.rows_written += table.num_rows
        if self.stats.first_row_s is None:
            self.stats.first_row_s = time.perf_counter() - t0
            self.stats.first_part_rows = table.num_rows
        self.stats.part_origin[shard_id] = {k: info[k] for k in ("slot", "node", "host", "pid")}
        if not any(
            i["pid"] == info["pid"] and i["node"] == info["node"] for i in self.stats.engine_info
        ):
            self.stats.engine_info.append({k: v for k, v in info.items() if k != "generate_s"})
        if self.on_rows:
            self.on_rows(table.num_rows, self.stats)

    def shutdown(self) -> None:
        """Close engines politely (vLLM stops its engine-core processes), then kill the actors.

        Only engines that are up get a close() call: one still starting (a replacement the
        run no longer needs) would answer only after its start, so it is killed at once.
        """
        ray = self._ray
        actors = list(self._actors.items())
        self._actors.clear()
        if not actors:
            return
        closing = [a.close.remote() for slot, a in actors if slot in self._up]
        if closing:
            try:
                ray.wait(closing, num_returns=len(closing), timeout=15)
            except Exception:
                pass
        for _, a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
