"""One attempt of a fan-out job: skip finished shards, run the rest on Ray, check every shard is
on disk once, and keep the manifest's `attempts` honest (an attempt that fails, Ctrl-C
included, says how it ended). The grid and the judge are both such jobs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rotserve.fanout.cluster import Placement, connect_ray, engine_env, place_engines
from rotserve.fanout.driver import FanOut, FanOutStats, Plan
from rotserve.fanout.errors import FanOutError
from rotserve.fanout.options import ExecutionOptions
from rotserve.fanout.provenance import now
from rotserve.fanout.store import PartStore
from rotserve.fanout.worker import Worker


@dataclass(frozen=True)
class Job:
    """A fan-out job over an open part store: what each actor runs, and where.

    `worker_spec(placement)` is the picklable spec every actor builds its `worker` from; it
    sees the placement because an engine's vLLM arguments depend on it (GPU or CPU, tensor
    parallel size)."""

    name: str  # "grid", "judge": the progress bar's label and the log's prefix
    actor_prefix: str  # Ray actor names: <prefix>-engine<slot>-<n>
    plan: Plan
    store: PartStore
    worker: type[Worker]
    worker_spec: Callable[[Placement], Any]
    options: ExecutionOptions
    headline: str  # what the job is, logged when an attempt starts


@dataclass(frozen=True)
class Attempt:
    """What one invocation of a fan-out job did."""

    state: str  # new | resume | overwrite: how the store was found
    stats: FanOutStats
    skipped: int  # shards already on disk when it started
    rows_total: int
    rows_per_s: float | None
    steady_rows_per_s: float | None
    timings: dict[str, float]


def run_attempt(job: Job, manifest: dict[str, Any], state: str, t0: float) -> Attempt:
    """Run the job's pending shards; `manifest` (the job's own, with an `attempts` list) gains
    this attempt and, on success, `status`, `rows` and `timings`. `t0` is when the job started
    (resolve time counts in `total_s`)."""
    job.options.check()  # before the manifest records an attempt that cannot start
    timings = {"resolve_s": time.perf_counter() - t0}
    store, plan = job.store, job.plan
    done = store.finished_shards(plan)
    pending = [s.shard_id for s in plan.shards if s.shard_id not in done]
    attempt: dict[str, Any] = {"started": now(), "state": state, "shards_skipped": len(done)}
    manifest["attempts"].append(attempt)
    store.write_manifest(manifest)
    log(job.headline)
    if done:
        log(
            f"resuming: {len(done)} of {len(plan.shards)} shards already on disk, "
            f"{len(pending)} to go"
        )
    try:
        stats = run_pending(job, pending, done, timings) if pending else FanOutStats()
        rows_total = _check_complete(store, plan)
    except BaseException as e:  # Ctrl-C included: say in the manifest how this attempt ended
        attempt.update(finished=now(), error=f"{type(e).__name__}: {e}".strip())
        store.write_manifest(manifest)
        raise
    timings["total_s"] = time.perf_counter() - t0
    rate, steady = throughput(stats, timings.get("generate_s", 0.0))
    attempt.update(
        finished=now(),
        shards_written=stats.shards_written,
        rows_written=stats.rows_written,
        engines=stats.engines,
        engine_failures=stats.engine_failures,
        requeued_shards=stats.requeued,
        duplicates_dropped=stats.duplicates_dropped,
        engine_info=stats.engine_info,
        parts=stats.part_origin,  # which engine, node and host wrote each part
        rows_per_s=_round(rate),
        steady_rows_per_s=_round(steady),
        timings={k: round(v, 2) for k, v in timings.items()},
    )
    manifest.update(status="complete", completed=now())
    manifest.update(rows={"expected": plan.n_rows, "written": rows_total})
    manifest["timings"] = attempt["timings"]
    store.write_manifest(manifest)
    return Attempt(state, stats, len(done), rows_total, rate, steady, timings)


def run_pending(
    job: Job, pending: list[str], done: set[str], timings: dict[str, float]
) -> FanOutStats:
    """Join (or start) Ray, place engines, run the pending shards with a progress bar.

    Fills `timings` (ray_start_s, generate_s, first_part_s); stops a Ray cluster it started.
    """
    import ray
    from tqdm import tqdm

    options, plan = job.options, job.plan
    t_ray = time.perf_counter()
    started_ray = connect_ray(options)
    timings["ray_start_s"] = time.perf_counter() - t_ray
    try:
        where = place_engines(options, len(pending))
        log(f"starting {where.engines} engine(s) ({where.describe()}) on Ray {ray.__version__}")
        bar = tqdm(
            total=plan.n_rows,
            initial=sum(plan.shard(s).n_rows for s in done),
            unit="row",
            desc=job.name,
            disable=not options.progress,
            dynamic_ncols=True,
            smoothing=0.05,
            file=sys.stderr,
        )
        n_shards = len(plan.shards)

        def on_rows(n: int, stats: FanOutStats) -> None:
            bar.update(n)
            bar.set_postfix_str(
                f"shards {len(done) + stats.shards_written}/{n_shards}", refresh=False
            )

        bar.set_postfix_str("starting engines")
        fan = FanOut(
            plan=plan,
            pending_ids=pending,
            store=job.store,
            worker=job.worker,
            spec=job.worker_spec(where),
            where=where,
            env=engine_env(options, where),
            name=job.actor_prefix,
            max_engine_failures=options.max_engine_failures,
            on_rows=on_rows,
            log=log,
        )
        try:
            stats = fan.run()
        finally:
            bar.close()
        timings["generate_s"] = stats.wall_s
        if stats.first_row_s is not None:
            timings["first_part_s"] = stats.first_row_s
        return stats
    finally:
        if started_ray:
            ray.shutdown()


def throughput(stats: FanOutStats, generate_s: float) -> tuple[float | None, float | None]:
    """(rows/s with engine start-up, rows/s once the first part was written), None if unknown.

    The first part's rows are left out of the steady rate: they paid for the engine start.
    """
    rate = stats.rows_written / generate_s if generate_s > 0 and stats.rows_written else None
    steady = None
    if stats.first_row_s is not None and generate_s - stats.first_row_s > 0:
        steady = (stats.rows_written - stats.first_part_rows) / (generate_s - stats.first_row_s)
    return rate, steady


def log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # keeps an active progress bar intact


def _round(x: float | None) -> float | None:
    return round(x, 2) if x else None


def _check_complete(store: PartStore, plan: Plan) -> int:
    """Every shard of the plan on disk once, with the planned number of rows; returns that."""
    missing = sorted({s.shard_id for s in plan.shards} - store.finished_shards(plan))
    if missing:
        raise FanOutError(f"shards {missing[:5]} are missing after the run; rerun to resume")
    rows_total = store.rows_written()
    if rows_total != plan.n_rows:
        raise FanOutError(f"{rows_total} rows on disk, expected {plan.n_rows}")
    return rows_total
