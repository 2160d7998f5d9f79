"""The grid job: every prompt at every angle, fanned out over vLLM engines on Ray, to Parquet.

    run_grid(GridConfig(...)) -> RunResult

reads as its stages:
    resolve   check every input, derive the run id              (config.py; no Ray, no vLLM)
    plan      the work units, cut into deterministic shards     (plan.py; pure)
    open      the run directory: new, resume or refuse          (store.py)
    run       engine actors pull shards; each becomes a part    (runner.py; Ray + vLLM)
    finish    check every shard is on disk once; manifest       (store.py)
    report    per-angle summary CSV/Markdown and a polar plot   (rotserve.report)
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rotserve.grid.config import (
    GridConfig,
    GridConfigError,
    ResolvedGrid,
    config_dict,
    evenly_spaced,
    parse_angle_list,
    resolve,
)
from rotserve.grid.plan import GridPlan, conditions, make_plan
from rotserve.grid.runner import (
    EngineFactory,
    EngineSpec,
    FanOut,
    FanOutStats,
    GridRunError,
    RowContext,
    root_cause,
)
from rotserve.grid.store import (
    FORMAT,
    REPORT_DIR,
    ROWS_DIR,
    SCHEMA,
    RunDirError,
    RunStore,
    git_commit,
    now,
    package_versions,
    read_rows,
)

__all__ = [
    "SCHEMA",
    "GridConfig",
    "GridConfigError",
    "GridRunError",
    "RunDirError",
    "RunResult",
    "evenly_spaced",
    "parse_angle_list",
    "read_rows",
    "run_grid",
]


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    rows_dir: Path
    manifest_path: Path
    state: str  # new | resume | overwrite (how the run directory was found)
    rows_total: int
    shards_total: int
    shards_skipped: int  # already on disk from an earlier attempt
    shards_written: int  # by this attempt
    rows_written: int
    wall_s: float
    generate_s: float  # engines started .. last part written
    rows_per_s: float | None  # rows_written / generate_s (engine startup included)
    steady_rows_per_s: float | None = None  # after the first part: engines up and generating
    engine_failures: int = 0
    report: Any = None  # rotserve.report.Report
    timings: dict[str, float] = field(default_factory=dict)


def run_grid(
    config: GridConfig,
    *,
    engine_factory: EngineFactory | None = None,
    argv: list[str] | None = None,
) -> RunResult:
    """Run (or resume) a grid and report it. Raises GridConfigError before anything starts."""
    t0 = time.perf_counter()
    log = _logger()
    resolved = resolve(config)  # every input checked; no Ray, no vLLM yet
    plan = plan_grid(resolved)
    store, state = RunStore.open(resolved.out, resolved.run_id, config.overwrite)
    try:
        timings = {"resolve_s": time.perf_counter() - t0}
        done = store.finished_shards(plan)
        pending = [s.shard_id for s in plan.shards if s.shard_id not in done]
        manifest = _manifest(resolved, plan, store, argv)
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
                stats = _run_pending(
                    resolved, plan, pending, store, done, engine_factory, timings, log
                )
            rows_total = _check_complete(store, plan)
        except BaseException as e:  # Ctrl-C included: say in the manifest how this attempt ended
            attempt.update(finished=now(), error=f"{type(e).__name__}: {e}".strip())
            store.write_manifest(manifest)
            raise
        timings["total_s"] = time.perf_counter() - t0
        result = _result(resolved, store, state, plan, done, stats, rows_total, timings)
        attempt.update(
            finished=now(),
            shards_written=stats.shards_written,
            rows_written=stats.rows_written,
            engines=stats.engines,
            engine_failures=stats.engine_failures,
            requeued_shards=stats.requeued,
            duplicates_dropped=stats.duplicates_dropped,
            engine_info=stats.engine_info,
            rows_per_s=_round(result.rows_per_s),
            steady_rows_per_s=_round(result.steady_rows_per_s),
            timings={k: round(v, 2) for k, v in timings.items()},
        )
        manifest.update(status="complete", completed=now())
        manifest.update(rows={"expected": plan.n_rows, "written": rows_total})
        manifest["timings"] = attempt["timings"]
        store.write_manifest(manifest)
    finally:
        store.close()
    if config.report:
        from rotserve.report import make_report

        result.report = make_report(store.root, out_dir=store.root / REPORT_DIR)
    return result


def _round(x: float | None) -> float | None:
    return round(x, 2) if x else None


def _check_complete(store: RunStore, plan: GridPlan) -> int:
    """Every shard of the plan on disk once, with the planned number of rows; returns that."""
    missing = sorted({s.shard_id for s in plan.shards} - store.finished_shards(plan))
    if missing:
        raise GridRunError(f"shards {missing[:5]} are missing after the run; rerun to resume")
    rows_total = store.rows_written()
    if rows_total != plan.n_rows:
        raise GridRunError(f"{rows_total} rows on disk, expected {plan.n_rows}")
    return rows_total


def _result(
    resolved: ResolvedGrid,
    store: RunStore,
    state: str,
    plan: GridPlan,
    done: set[str],
    stats: FanOutStats,
    rows_total: int,
    timings: dict[str, float],
) -> RunResult:
    generate_s = timings.get("generate_s", 0.0)
    rate = stats.rows_written / generate_s if generate_s > 0 and stats.rows_written else None
    steady = None
    if stats.first_row_s is not None and generate_s - stats.first_row_s > 0:
        steady = (stats.rows_written - stats.first_part_rows) / (generate_s - stats.first_row_s)
    return RunResult(
        run_id=resolved.run_id,
        run_dir=store.root,
        rows_dir=store.rows_dir,
        manifest_path=store.root / "manifest.json",
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


def plan_grid(resolved: ResolvedGrid) -> GridPlan:
    c = resolved.config
    conds = conditions(resolved.angles, c.adaptive_modes, c.baseline)
    return make_plan(resolved.prompt_sets, conds, c.shard_size, c.samples_per_prompt)


def _logger():
    def log(msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)

    return log


def _run_pending(
    resolved: ResolvedGrid,
    plan: GridPlan,
    pending: list[str],
    store: RunStore,
    done: set[str],
    engine_factory: EngineFactory | None,
    timings: dict[str, float],
    log,
) -> FanOutStats:
    import ray
    from tqdm import tqdm

    c = resolved.config
    t_ray = time.perf_counter()
    started_ray = _connect_ray(c)
    timings["ray_start_s"] = time.perf_counter() - t_ray
    try:
        use_gpu, gpe, engines, tp = _placement(c, len(pending))
        where = (
            f"{gpe} GPU(s) each, tensor parallel {tp}"
            if use_gpu
            else f"CPU, {c.cpus_per_engine} core(s) each"
        )
        log(f"starting {engines} engine(s) ({where}) on Ray {ray.__version__}")
        spec = EngineSpec(
            model=resolved.model,
            plane_path=str(resolved.plane_path),
            plane_bytes=resolved.plane_path.read_bytes(),
            plane_sha256=resolved.plane_sha256,
            dtype=c.dtype,
            revision=c.revision,
            tensor_parallel_size=tp,
            use_gpu=use_gpu,
            cpus_per_engine=c.cpus_per_engine,
            env={**({} if c.verbose else {"VLLM_LOGGING_LEVEL": "WARNING"}), **engine_env(use_gpu)},
            llm_kwargs={
                **engine_kwargs(use_gpu),
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
        )
        done_rows = sum(plan.shard(s).n_rows for s in done)
        bar = tqdm(
            total=plan.n_rows,
            initial=done_rows,
            unit="row",
            desc="grid",
            disable=not c.progress,
            dynamic_ncols=True,
            smoothing=0.05,
            file=sys.stderr,
        )
        n_done = len(done)

        def on_rows(n: int, stats: FanOutStats) -> None:
            bar.update(n)
            bar.set_postfix_str(
                f"shards {n_done + stats.shards_written}/{len(plan.shards)}", refresh=False
            )

        bar.set_postfix_str("starting engines")
        fan = FanOut(
            plan=plan,
            pending_ids=pending,
            store=store,
            spec=spec,
            ctx=ctx,
            engines=engines,
            use_gpu=use_gpu,
            gpus_per_engine=gpe,
            cpus_per_engine=c.cpus_per_engine,
            max_engine_failures=c.max_engine_failures,
            factory=engine_factory,
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


def engine_env(use_gpu: bool) -> dict[str, str]:
    """CPU engines run vLLM's engine core inside the actor process (see engine_kwargs)."""
    return {} if use_gpu else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def engine_kwargs(use_gpu: bool) -> dict[str, Any]:
    """vLLM arguments per placement.

    CPU: engine core and model worker in the actor's own process ("uni" executor, no
    multiprocessing). A CPU engine is then exactly one process on its one pinned core, so
    Ray's num_cpus accounting is true, starting it spawns no further interpreters (measured
    on the 2-core dev machine: ~33 s instead of ~55 s per engine), and killing the actor
    leaves no orphan engine-core process. Outputs are token-identical to the default layout.
    GPU: vLLM's defaults (a separate engine-core process overlaps scheduling with the GPU).
    """
    return {} if use_gpu else {"distributed_executor_backend": "uni"}


def _connect_ray(c: GridConfig) -> bool:
    """Join the given cluster, or start a local one; True if this call started Ray."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": c.verbose,
        "logging_level": logging.INFO if c.verbose else logging.WARNING,
    }
    if c.ray_address:
        try:
            ray.init(address=c.ray_address, **kwargs)
        except Exception as e:  # ConnectionError, auth errors, timeouts: all "cannot join"
            raise GridRunError(
                f"cannot join the Ray cluster at --ray-address {c.ray_address}: {root_cause(e)}"
            ) from None
    else:
        # "local": always a fresh cluster of this machine, never whatever `ray start` left running.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, **kwargs)
    return True


def _placement(c: GridConfig, n_pending: int) -> tuple[bool, int, int, int]:
    """(use_gpu, gpus per engine, engines, tensor parallel size) for the connected cluster."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    gpe = c.gpus_per_engine if c.gpus_per_engine is not None else (1 if gpus else 0)
    use_gpu = gpe > 0
    tp = c.tensor_parallel_size or max(1, gpe)
    if use_gpu:
        if tp > gpe:
            raise GridConfigError(
                f"--tensor-parallel-size {tp} needs {tp} GPUs per engine; "
                f"--gpus-per-engine is {gpe}"
            )
        capacity = gpus // gpe
        unit = f"{gpus} GPU(s), {gpe} per engine"
    else:
        if tp > 1:
            raise GridConfigError(
                "--tensor-parallel-size > 1 needs GPU engines (--gpus-per-engine)"
            )
        capacity = cpus // c.cpus_per_engine
        unit = f"{cpus} CPU(s), {c.cpus_per_engine} per engine"
    if capacity < 1:
        raise GridConfigError(f"the Ray cluster has room for no engine ({unit})")
    # CPU default leaves one core to the driver and Ray: on the 2-core dev machine one engine
    # finishes the 72-angle toy grid in ~60 s, two take ~90 s (their starts fight for cores).
    default = capacity if use_gpu else max(1, (cpus - 1) // c.cpus_per_engine)
    engines = c.engines or default
    if engines > capacity:
        raise GridConfigError(
            f"--engines {engines} does not fit the Ray cluster ({unit}: at most {capacity})"
        )
    return use_gpu, gpe, min(engines, n_pending), tp


def _manifest(
    resolved: ResolvedGrid, plan: GridPlan, store: RunStore, argv: list[str] | None
) -> dict[str, Any]:
    c = resolved.config
    previous = store.read_manifest() or {}
    plane_meta = asdict(resolved.plane.meta)
    return {
        "format": FORMAT,
        "run_id": resolved.run_id,
        "status": "running",
        "created": previous.get("created", now()),
        "command": argv,  # of the latest attempt
        "config": config_dict(c),
        "resolved": {
            "model": resolved.model,
            "model_is_local": resolved.model_is_local,
            "revision": c.revision,
            "hidden_size": resolved.hidden_size,
            "angles": list(resolved.angles),
            "modes": ["adaptive" if m else "plain" for m in c.adaptive_modes],
            "baseline": c.baseline,
            "out": str(store.root),
        },
        "identity": resolved.identity(),
        "plane": {
            "path": str(resolved.plane_path),
            "sha256": resolved.plane_sha256,
            "plane_id": resolved.plane.plane_id,
            "hidden_size": resolved.plane.hidden_size,
            "meta": plane_meta,
        },
        "prompts": [
            {"label": s.label, "path": str(s.path), "sha256": s.sha256, "n": len(s.prompts)}
            for s in resolved.prompt_sets
        ],
        "plan": {
            "fingerprint": plan.fingerprint,
            "conditions": len(plan.conditions),
            "units": plan.n_units,
            "samples_per_prompt": plan.samples,
            "shard_size": c.shard_size,
            "shards": len(plan.shards),
        },
        "rows": {"expected": plan.n_rows, "written": None},
        "layout": {"rows": f"{ROWS_DIR}/part-NNNNN.parquet (one per shard)", "report": REPORT_DIR},
        "schema": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in SCHEMA],
        "versions": package_versions(),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "attempts": list(previous.get("attempts", [])),
    }
