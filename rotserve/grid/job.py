"""The grid job, as its stages:

    resolve   check every input, derive the run id              (config.py; no Ray, no vLLM)
    plan      the work units, cut into deterministic shards     (plan.py; pure)
    open      the run directory: new, resume or refuse          (store.py)
    run       engine actors pull shards; each becomes a part    (cluster.py, runner.py)
    finish    check every shard is on disk once; manifest       (store.py, manifest.py)

The report is not a stage: it reads the finished run directory (rotserve.rundir), and the
CLI chains the two.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rotserve.grid.cluster import connect_ray, engine_env, engine_kwargs, place_engines
from rotserve.grid.config import GridConfig, ResolvedGrid, resolve
from rotserve.grid.manifest import build_manifest, now
from rotserve.grid.plan import GridPlan, conditions, make_plan
from rotserve.grid.result import RunResult, throughput
from rotserve.grid.runner import (
    EngineFactory,
    EngineSpec,
    FanOut,
    FanOutStats,
    GridRunError,
    RowContext,
)
from rotserve.grid.store import RunStore


def run_grid(
    config: GridConfig,
    *,
    engine_factory: EngineFactory | None = None,
    argv: list[str] | None = None,
) -> RunResult:
    """Run (or resume) a grid. Raises GridConfigError (or RunDirError) before anything starts."""
    t0 = time.perf_counter()
    log = _log
    resolved = resolve(config)  # every input checked; no Ray, no vLLM yet
    plan = plan_grid(resolved)
    store, state = RunStore.open(resolved.out, resolved.run_id, config.overwrite)
    try:
        timings = {"resolve_s": time.perf_counter() - t0}
        done = store.finished_shards(plan)
        pending = [s.shard_id for s in plan.shards if s.shard_id not in done]
        manifest = build_manifest(resolved, plan, store.root, store.read_manifest(), argv)
        attempt: dict[str, Any] = {"started": now(), "state": state, "shards_skipped": len(done)}
        manifest["attempts"].append(attempt)
        store.write_manifest(manifest)
        n_prompts = sum(len(s.prompts) for s in resolved.prompt_sets)
        log(
            f"run {resolved.run_id}: {plan.n_rows} rows = {n_prompts} prompts × "
            f"{len(plan.conditions)} conditions × {plan.samples} sample(s), "
            f"{len(plan.shards)} shards -> {store.root}"
        )
        if done:
            log(
                f"resuming: {len(done)} of {len(plan.shards)} shards already on disk, "
                f"{len(pending)} to go"
            )
        try:
            stats = FanOutStats()
            if pending:
                stats = _run_pending(resolved, plan, pending, store, done, engine_factory, timings)
            rows_total = _check_complete(store, plan)
        except BaseException as e:  # Ctrl-C included: say in the manifest how this attempt ended
            attempt.update(finished=now(), error=f"{type(e).__name__}: {e}".strip())
            store.write_manifest(manifest)
            raise
        timings["total_s"] = time.perf_counter() - t0
        generate_s = timings.get("generate_s", 0.0)
        rate, steady = throughput(stats, generate_s)
        result = RunResult(
            run_id=resolved.run_id,
            run_dir=store.root,
            rows_dir=store.rows_dir,
            manifest_path=store.manifest_path,
            state=state,
            rows_total=rows_total,
            shards_total=len(plan.shards),
            shards_skipped=len(done),
            shards_written=stats.shards_written,
            rows_written=stats.rows_written,
            wall_s=timings["total_s"],
            generate_s=generate_s,
            rows_per_s=rate,
            steady_rows_per_s=steady,
            engine_failures=stats.engine_failures,
            timings=timings,
        )
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
    finally:
        store.close()
    return result


def plan_grid(resolved: ResolvedGrid) -> GridPlan:
    c = resolved.config
    conds = conditions(
        resolved.angles, c.adaptive_modes, c.baseline, resolved.plane_names, resolved.windows
    )
    return make_plan(resolved.prompt_sets, conds, c.shard_size, c.samples_per_prompt)


def _round(x: float | None) -> float | None:
    return round(x, 2) if x else None


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # keeps an active progress bar intact


def _check_complete(store: RunStore, plan: GridPlan) -> int:
    """Every shard of the plan on disk once, with the planned number of rows; returns that."""
    missing = sorted({s.shard_id for s in plan.shards} - store.finished_shards(plan))
    if missing:
        raise GridRunError(f"shards {missing[:5]} are missing after the run; rerun to resume")
    rows_total = store.rows_written()
    if rows_total != plan.n_rows:
        raise GridRunError(f"{rows_total} rows on disk, expected {plan.n_rows}")
    return rows_total


def _run_pending(
    resolved: ResolvedGrid,
    plan: GridPlan,
    pending: list[str],
    store: RunStore,
    done: set[str],
    engine_factory: EngineFactory | None,
    timings: dict[str, float],
) -> FanOutStats:
    import ray
    from tqdm import tqdm

    c = resolved.config
    t_ray = time.perf_counter()
    started_ray = connect_ray(c)
    timings["ray_start_s"] = time.perf_counter() - t_ray
    try:
        where = place_engines(c, len(pending))
        _log(f"starting {where.engines} engine(s) ({where.describe()}) on Ray {ray.__version__}")
        spec = EngineSpec(
            model=resolved.model,
            plane_path=str(resolved.plane_path),
            plane_bytes=resolved.plane_path.read_bytes(),
            plane_sha256=resolved.plane_sha256,
            planes=tuple(
                (name, str(path), path.read_bytes(), sha)
                for (name, path), (_, sha) in zip(
                    resolved.steering.settings.planes, resolved.plane_shas, strict=True
                )
            )
            if resolved.config.planes
            else (),
            dtype=c.dtype,
            revision=c.revision,
            tensor_parallel_size=where.tensor_parallel_size,
            use_gpu=where.use_gpu,
            cpus_per_engine=c.cpus_per_engine,
            env={
                **({} if c.verbose else {"VLLM_LOGGING_LEVEL": "WARNING"}),
                **engine_env(where.use_gpu),
            },
            llm_kwargs={
                **engine_kwargs(where.use_gpu),
                **({"enforce_eager": True} if c.enforce_eager else {}),
            },
        )
        ctx = RowContext(
            run_id=resolved.run_id,
            model=resolved.model,
            plane_id=resolved.plane.plane_id,
            max_tokens=c.max_tokens,
            temperature=float(c.temperature),
            seed=c.seed,
            samples=c.samples_per_prompt,
            coherence=c.coherence,
            selective=dict(resolved.selective),
        )
        bar = tqdm(
            total=plan.n_rows,
            initial=sum(plan.shard(s).n_rows for s in done),
            unit="row",
            desc="grid",
            disable=not c.progress,
            dynamic_ncols=True,
            smoothing=0.05,
            file=sys.stderr,
        )

        def on_rows(n: int, stats: FanOutStats) -> None:
            bar.update(n)
            bar.set_postfix_str(
                f"shards {len(done) + stats.shards_written}/{len(plan.shards)}", refresh=False
            )

        bar.set_postfix_str("starting engines")
        fan = FanOut(
            plan=plan,
            pending_ids=pending,
            store=store,
            spec=spec,
            ctx=ctx,
            engines=where.engines,
            use_gpu=where.use_gpu,
            gpus_per_engine=where.gpus_per_engine,
            cpus_per_engine=c.cpus_per_engine,
            max_engine_failures=c.max_engine_failures,
            factory=engine_factory,
            on_rows=on_rows,
            log=_log,
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
