"""The grid job, as its stages:

    resolve   check every input, derive the run id              (config.py; no Ray, no vLLM)
    plan      the work units, cut into deterministic shards     (plan.py; pure)
    open      the run directory: new, resume or refuse          (store.py)
    run       engine actors turn shards into rows, one part each (rows.py on rotserve.fanout)
    finish    every shard on disk once; the manifest            (rotserve.fanout, manifest.py)

The report is not a stage: it reads the finished run directory (rotserve.rundir).
"""

from __future__ import annotations

import time
from functools import partial

from rotserve.dtype import choose_dtype
from rotserve.fanout import Job, Placement, PlaneFile, engine_spec, run_attempt
from rotserve.fanout.job import log
from rotserve.grid.config import GridConfig, ResolvedGrid, resolve
from rotserve.grid.manifest import build_manifest
from rotserve.grid.plan import GridPlan, conditions, make_plan
from rotserve.grid.result import RunResult
from rotserve.grid.rows import GridWorker, GridWorkerSpec, RowContext
from rotserve.grid.store import RunStore


def run_grid(config: GridConfig, *, argv: list[str] | None = None) -> RunResult:
    """Run (or resume) a grid. Raises GridConfigError (or RunDirError) before anything starts;
    `argv` is recorded in the manifest."""
    t0 = time.perf_counter()
    resolved = resolve(config)  # every input checked; no Ray, no vLLM yet
    plan = plan_grid(resolved)
    store, state = RunStore.open(resolved.out, resolved.run_id, config.overwrite)
    try:
        manifest = build_manifest(resolved, plan, store.root, store.read_manifest(), argv)
        n_prompts = sum(len(s.prompts) for s in resolved.prompt_sets)
        job = Job(
            name="grid",
            actor_prefix=f"rotserve-grid-{resolved.run_id}",
            plan=plan,
            store=store,
            worker=GridWorker,
            worker_spec=partial(grid_worker_spec, resolved),
            options=config.execution,
            headline=f"run {resolved.run_id}: {plan.n_rows} rows = {n_prompts} prompts × "
            f"{len(plan.conditions)} conditions × {plan.samples} sample(s), "
            f"{len(plan.shards)} shards -> {store.root}",
        )
        attempt = run_attempt(job, manifest, state, t0)
    finally:
        store.close()
    stats = attempt.stats
    return RunResult(
        run_id=resolved.run_id,
        run_dir=store.root,
        rows_dir=store.rows_dir,
        manifest_path=store.manifest_path,
        state=state,
        rows_total=attempt.rows_total,
        shards_total=len(plan.shards),
        shards_skipped=attempt.skipped,
        shards_written=stats.shards_written,
        rows_written=stats.rows_written,
        wall_s=attempt.timings["total_s"],
        generate_s=attempt.timings.get("generate_s", 0.0),
        rows_per_s=attempt.rows_per_s,
        steady_rows_per_s=attempt.steady_rows_per_s,
        engine_failures=stats.engine_failures,
        timings=attempt.timings,
    )


def plan_grid(resolved: ResolvedGrid) -> GridPlan:
    c = resolved.config
    conds = conditions(
        resolved.angles, c.adaptive_masks, c.baseline, resolved.plane_names, resolved.windows
    )
    return make_plan(resolved.prompt_sets, conds, c.shard_size, c.samples_per_prompt)


def grid_worker_spec(r: ResolvedGrid, where: Placement) -> GridWorkerSpec:
    """The spec of every grid actor at a placement: the engine (model, planes, vLLM
    arguments) and the rows' constants."""
    c = r.config
    # Each engine resolves "auto" on its own node (recorded in the manifest's engine_info);
    # this is what it means on the driver's machine.
    log(f"engines: {choose_dtype(c.dtype, gpu=where.use_gpu).describe()}")
    planes = tuple(
        PlaneFile(name, str(path), path.read_bytes(), sha)
        for (name, path), (_, sha) in zip(r.steering.settings.planes, r.plane_shas, strict=True)
    )
    engine = engine_spec(
        where,
        r.model,
        dtype=c.dtype,
        enforce_eager=c.enforce_eager,
        revision=c.revision,
        # A sweep names its planes; a single-plane engine keeps its one-plane settings.
        plane=None if c.planes else planes[0],
        planes=planes if c.planes else (),
    )
    rows = RowContext(
        run_id=r.run_id,
        model=r.model,
        plane_id=r.plane.plane_id,
        max_tokens=c.max_tokens,
        temperature=float(c.temperature),
        seed=c.seed,
        samples=c.samples_per_prompt,
        coherence=c.coherence,
        selective=dict(r.selective),
    )
    return GridWorkerSpec(engine, rows)
