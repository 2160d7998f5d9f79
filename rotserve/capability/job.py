"""The capability job, as its stages (on rotserve.fanout, into a capability table):

resolve   settings (a run's, or the command line's), lm-eval tasks, every engine
          request built once by lm-eval's own request code                 (config.py, tasks.py)
plan      requests x settings, cut into deterministic shards               (plan.py; pure)
open      the table: new, resume or refuse                                 (store.py)
run       steered engines on Ray answer shards, every setting in one batch (engine.py)
score     lm-eval's metrics per setting from the answers on disk           (tasks.py)
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rotserve.capability.config import (
    CapabilityConfig,
    ResolvedCapability,
    config_dict,
    resolve,
)
from rotserve.capability.engine import AnswerContext, CapabilityWorker, CapabilityWorkerSpec
from rotserve.capability.plan import setting_key
from rotserve.capability.table import (
    ANSWER_SCHEMA,
    CAPABILITY_FORMAT,
    ITEM_SCHEMA,
    ITEMS_FILE,
    SCORE_SCHEMA,
    SCORES_FILE,
)
from rotserve.capability.tasks import (
    EvalOptions,
    LoadedTasks,
    instance_answers,
    lm_eval_version,
    score,
)
from rotserve.fanout import Job, Placement, now, provenance, run_attempt
from rotserve.fanout.job import log
from rotserve.grid.job import grid_worker_spec
from rotserve.grid.plan import Condition
from rotserve.rundir import part_files_in


@dataclass(frozen=True)
class CapabilityResult:
    capability_id: str
    run_id: str | None
    root: Path  # the run directory (or --out) holding capability/<name>/
    name: str
    table_dir: Path
    scores_path: Path
    manifest_path: Path
    state: str  # new | resume | overwrite
    settings: int
    requests: int  # engine requests per setting
    answers_total: int
    shards_total: int
    shards_skipped: int
    shards_written: int
    wall_s: float
    score_s: float
    answers_per_s: float | None
    engine_failures: int = 0


def run_capability(config: CapabilityConfig, *, argv: list[str] | None = None) -> CapabilityResult:
    """Evaluate lm-eval tasks at every setting into a capability table (or resume one).

    Raises CapabilityConfigError (or RunDirError) before Ray or any engine starts."""
    from rotserve.capability.store import CapabilityStore

    t0 = time.perf_counter()
    resolved = resolve(config, log=log)
    plan, cid = resolved.plan, resolved.capability_id
    resolved.root.mkdir(parents=True, exist_ok=True)
    store, state = CapabilityStore.open(resolved.root, resolved.name, cid, config.overwrite)
    try:
        store.write_file(ITEMS_FILE, items_table(resolved))
        manifest = capability_manifest(resolved, store.read_manifest(), argv)
        job = Job(
            name="capability",
            actor_prefix=f"rotserve-capability-{cid}",
            plan=plan,
            store=store,
            worker=CapabilityWorker,
            worker_spec=partial(capability_worker_spec, resolved),
            options=config.execution,
            headline=f"capability {resolved.name}: {len(plan.requests)} requests "
            f"({', '.join(resolved.loaded.names)}) × {len(plan.settings)} settings = "
            f"{plan.n_rows} answers, {len(plan.shards)} shards -> {store.table_dir}",
        )
        attempt = run_attempt(job, manifest, state, t0)
        manifest["status"] = "scoring"  # the answers are complete; the scores are not yet
        store.write_manifest(manifest)
        t_score = time.perf_counter()
        scores = score_table(resolved, store.parts_dir, progress=config.execution.progress)
        store.write_file(SCORES_FILE, scores)
        score_s = time.perf_counter() - t_score
        manifest["timings"] = {**manifest.get("timings", {}), "score_s": round(score_s, 2)}
        manifest.update(status="complete", scores={"rows": scores.num_rows, "file": SCORES_FILE})
        store.write_manifest(manifest)
    finally:
        store.close()
    stats = attempt.stats
    return CapabilityResult(
        capability_id=cid,
        run_id=resolved.run_id,
        root=resolved.root,
        name=resolved.name,
        table_dir=store.table_dir,
        scores_path=store.table_dir / SCORES_FILE,
        manifest_path=store.manifest_path,
        state=state,
        settings=len(plan.settings),
        requests=len(plan.requests),
        answers_total=attempt.rows_total,
        shards_total=len(plan.shards),
        shards_skipped=attempt.skipped,
        shards_written=stats.shards_written,
        wall_s=time.perf_counter() - t0,
        score_s=score_s,
        answers_per_s=attempt.rows_per_s,
        engine_failures=stats.engine_failures,
    )


def capability_worker_spec(r: ResolvedCapability, where: Placement) -> CapabilityWorkerSpec:
    """Every actor's engine is the grid's engine for the same model and planes (the same
    dtype, planes and vLLM arguments), so the settings mean what they meant in the run."""
    engine = grid_worker_spec(r.grid, where).engine
    ctx = AnswerContext(capability_id=r.capability_id, selective=dict(r.grid.selective))
    return CapabilityWorkerSpec(engine, ctx)


def items_table(r: ResolvedCapability) -> pa.Table:
    rows = [{"capability_id": r.capability_id, **item} for item in r.recorded.items]
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def score_table(r: ResolvedCapability, answers_dir: Path, progress: bool = False) -> pa.Table:
    """lm-eval's metrics at every setting, from the answers on disk, as the scores table."""
    answers = (
        row
        for f in part_files_in(answers_dir)
        for row in pq.read_table(f, schema=ANSWER_SCHEMA).to_pylist()
    )
    scores = score_answers(
        r.loaded, r.recorded.items, r.tokenizer, r.options, r.settings, answers, progress
    )
    constants = {"capability_id": r.capability_id, "run_id": r.run_id, "model": r.model}
    return pa.Table.from_pylist([{**constants, **s} for s in scores], schema=SCORE_SCHEMA)


def score_answers(
    loaded: LoadedTasks,
    items: Sequence[dict[str, Any]],
    tokenizer: Any,
    options: EvalOptions,
    settings: Sequence[Condition],
    answers: Iterable[dict[str, Any]],
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One lm-eval evaluate per setting over the engine's answers (rows of ANSWER_SCHEMA):
    score rows with the setting's key columns."""
    from tqdm import tqdm

    by_setting: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in answers:
        by_setting[tuple(setting_key(_condition(row)))][row["request_key"]] = row
    rows = []
    for setting in tqdm(settings, desc="scoring", unit="setting", disable=not progress):
        per_instance = instance_answers(items, by_setting[tuple(setting_key(setting))])
        for s in score(loaded, tokenizer, per_instance, options):
            rows.append(
                {
                    **s,
                    "angle": setting.angle,
                    "adaptive": setting.adaptive,
                    "plane": setting.plane,
                    "window": setting.window,
                }
            )
    return rows


def _condition(row: dict[str, Any]) -> Condition:
    return Condition(row["angle"], row["adaptive"], row["plane"], row["window"])


def capability_manifest(
    r: ResolvedCapability, previous: dict[str, Any] | None, argv: list[str] | None
) -> dict[str, Any]:
    previous = previous or {}
    g, o = r.grid, r.options
    return {
        "format": CAPABILITY_FORMAT,
        "capability_id": r.capability_id,
        "run_id": r.run_id,
        "name": r.name,
        "status": "running",
        "created": previous.get("created", now()),
        "command": argv,
        "config": config_dict(r.config),
        "model": {
            "model": g.model,
            "model_is_local": g.model_is_local,
            "revision": g.config.revision,
            "dtype": g.config.dtype,
            "enforce_eager": g.config.enforce_eager,
        },
        "planes": [
            {"name": name, "path": str(path), "sha256": sha}
            for (name, path), (_, sha) in zip(g.steering.settings.planes, g.plane_shas, strict=True)
        ],
        "settings": [
            {"angle": s.angle, "adaptive": s.adaptive, "plane": s.plane, "window": s.window}
            for s in r.settings
        ],
        "selective_layers": dict(g.selective),
        "tasks": {
            "names": list(r.loaded.names),
            "include_paths": list(r.loaded.include_paths),
            "documents": r.recorded.n_docs,
            "versions": r.loaded.versions,
            "configs": r.loaded.configs,
            "fingerprint": r.loaded.fingerprint(),
            "lm_eval": lm_eval_version(),
            "limit": o.limit,
            "num_fewshot": o.num_fewshot,
            "apply_chat_template": o.apply_chat_template,
            "max_length": o.max_length,
            "bootstrap_iters": o.bootstrap_iters,
            # generation arguments of the tasks that the engine (like vLLM's server) ignores
            "ignored_gen_kwargs": list(r.recorded.ignored_gen_kwargs),
        },
        "identity": r.identity(),
        "plan": {
            "fingerprint": r.plan.fingerprint,
            "requests": len(r.plan.requests),
            "settings": len(r.plan.settings),
            "shard_size": r.config.shard_size,
            "shards": len(r.plan.shards),
        },
        "rows": {"expected": r.plan.n_rows, "written": None},
        "schema": {
            "answers": [str(f) for f in ANSWER_SCHEMA],
            "scores": [str(f) for f in SCORE_SCHEMA],
        },
        **provenance(),
        "attempts": list(previous.get("attempts", [])),
    }
