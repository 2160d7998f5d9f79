"""The judge job, as its stages (on rotserve.fanout, into a verdict table):

resolve   check run directory, rubric, judge; build every row's prompt   (config.py)
          and the judge canary's anchors the same way                    (anchors.py)
plan      one item per row, by row key, cut into deterministic shards    (plan.py; pure)
open      the verdict table: new, resume or refuse                       (store.py)
run       each judge engine passes the canary, then turns shards into    (engine.py)
          verdicts, one part each
finish    every shard on disk once; the table's manifest, with the       (rotserve.fanout)
          canary's result and any override
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rotserve.dtype import choose_dtype
from rotserve.fanout import (
    FanOutError,
    Job,
    Placement,
    engine_spec,
    now,
    provenance,
    run_attempt,
)
from rotserve.fanout.job import log
from rotserve.judge.anchors import CANARY_RULE
from rotserve.judge.config import (
    JudgeCanaryError,
    JudgeConfig,
    ResolvedJudge,
    config_dict,
    resolve,
)
from rotserve.judge.engine import GRAMMAR_BACKEND, JudgeWorker, JudgeWorkerSpec, VerdictContext
from rotserve.judge.prompts import TRUNCATION_RULE
from rotserve.judge.rubrics import CHOICE_WHITESPACE, Rubric
from rotserve.judge.store import VerdictStore
from rotserve.judge.verdict import TOP_LOGPROBS
from rotserve.rundir import VERDICT_FORMAT, VERDICT_SCHEMA, part_files_in


@dataclass(frozen=True)
class JudgeResult:
    run_id: str
    run_dir: Path
    name: str  # the verdict table's name
    table_dir: Path  # RUN_DIR/verdicts/<name>/: read it with any Parquet reader
    manifest_path: Path
    state: str  # new | resume | overwrite
    rows_total: int
    judged: int  # rows the judge model answered (the others: the rubric's rule)
    by_rule: int
    truncated: int
    shards_total: int
    shards_skipped: int
    shards_written: int
    wall_s: float
    rows_per_s: float | None
    engine_failures: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    clipped: int = 0  # generations the rubric's clip cut (HarmBench's 512 tokens)
    unparsed: int = 0  # answers the rubric's reading did not know (given its fallback label)
    canary: dict[str, Any] = field(default_factory=dict)  # the manifest's `canary` record


def run_judge(
    config: JudgeConfig,
    *,
    argv: list[str] | None = None,
) -> JudgeResult:
    """Judge every row of a complete grid run into its own verdict table (or resume one).

    Raises JudgeConfigError (or RunDirError) before Ray or any engine starts, and
    JudgeCanaryError when a judge engine fails the canary (no verdict written then).
    """
    t0 = time.perf_counter()
    resolved = resolve(config, log=log)
    plan = resolved.plan
    store, state = VerdictStore.open(
        resolved.run_dir, resolved.name, resolved.run_id, resolved.verdict_id, config.overwrite
    )
    try:
        previous = store.read_manifest() or {}
        manifest = verdict_manifest(resolved, previous, argv)
        job = Job(
            name="judge",
            actor_prefix=f"rotserve-judge-{resolved.run_id}-{resolved.verdict_id}",
            plan=plan,
            store=store,
            worker=JudgeWorker,
            worker_spec=partial(judge_worker_spec, resolved),
            options=config.execution,
            headline=f"judge {resolved.name}: {plan.n_rows} rows of run {resolved.run_id} "
            f"({plan.n_rows - resolved.n_rule} to the judge, {resolved.n_rule} by the rubric's "
            f"rule, {resolved.n_truncated} truncated), {len(plan.shards)} shards -> "
            f"{store.parts_dir}",
        )
        if resolved.canary is not None:
            log(f"judge canary: {len(resolved.canary.anchors)} anchors before any row")
        try:
            attempt = run_attempt(job, manifest, state, t0)
        except FanOutError as e:
            line = canary_failure(e)
            if line is None:
                raise
            manifest["canary"] = {**manifest["canary"], "status": "failed", "report": line}
            store.write_manifest(manifest)
            raise JudgeCanaryError(
                f"{line}. Nothing was judged: rubric {resolved.rubric.name!r} needs a judge that "
                "gets its anchors (data/anchors/, or the rubric file's), or judge anyway with "
                f"`rotserve judge {resolved.run_dir} --judge {resolved.config.judge} --rubric "
                f"{resolved.config.rubric} --accept-judge-canary-failure` (recorded in the "
                "manifest)"
            ) from None
        manifest["canary"] = canary_after(manifest, previous)
        counts, unparsed = label_counts(store.parts_dir)
        manifest["labels_counted"] = counts
        manifest["counts"]["unparsed"] = unparsed
        store.write_manifest(manifest)
        stats = attempt.stats
        return JudgeResult(
            run_id=resolved.run_id,
            run_dir=resolved.run_dir,
            name=resolved.name,
            table_dir=store.parts_dir,
            manifest_path=store.manifest_path,
            state=state,
            rows_total=attempt.rows_total,
            judged=plan.n_rows - resolved.n_rule,
            by_rule=resolved.n_rule,
            truncated=resolved.n_truncated,
            shards_total=len(plan.shards),
            shards_skipped=attempt.skipped,
            shards_written=stats.shards_written,
            wall_s=attempt.timings["total_s"],
            rows_per_s=attempt.rows_per_s,
            engine_failures=stats.engine_failures,
            label_counts=counts,
            clipped=resolved.n_clipped,
            unparsed=unparsed,
            canary=manifest["canary"],
        )
    finally:
        store.close()


CANARY_FAILED = "judge canary failed:"
RESULTS = ("passed", "failed, accepted")  # canary statuses of a table with verdicts


def canary_failure(err: BaseException) -> str | None:
    """The canary's one-line report inside a fan-out error (an engine that failed to start
    because its canary failed), or None for any other failure."""
    text = str(err)
    at = text.find(CANARY_FAILED)
    if at < 0:
        return None
    return text[at:].split("\n", 1)[0].strip()


def canary_record(resolved: ResolvedJudge) -> dict[str, Any]:
    """The manifest's `canary` before the engines start: what will run, and any override."""
    c = resolved.config
    if resolved.canary is None:
        return {
            "status": "not run",
            "why": resolved.canary_note,
            "rule": CANARY_RULE,
            "override": "--skip-judge-canary" if c.skip_canary else None,
        }
    return {
        "status": "pending",
        "rule": CANARY_RULE,
        "anchors": len(resolved.canary.anchors),
        "override": "--accept-judge-canary-failure" if c.accept_canary_failure else None,
    }


def canary_after(manifest: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """The `canary` record after a successful attempt: the engines' results (each engine ran
    it as it started); when no engine started (every shard was on disk), the record the
    verdicts on disk were made under."""
    record = dict(manifest["canary"])
    results = [
        info["judge_canary"]
        for info in (manifest["attempts"][-1].get("engine_info") or [])
        if "judge_canary" in info
    ]
    if not results:
        earlier = previous.get("canary") or {}
        if record["status"] == "pending" and earlier.get("status") in RESULTS:
            return earlier
        if record["status"] == "pending":
            record.update(status="not run", why="no engine started: every shard was on disk")
        return record
    first = results[0]
    status = "passed" if all(r["passed"] for r in results) else "failed, accepted"
    return {**record, "status": status, "engines": len(results), **first}


def label_counts(table_dir: Path) -> tuple[dict[str, int], int]:
    """Verdicts per label, and how many answers the rubric's reading did not know."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    unparsed = 0
    for f in part_files_in(table_dir):
        t = pq.read_table(f, columns=["label", "parsed"])
        for label in t.column("label").to_pylist():
            counts[label] = counts.get(label, 0) + 1
        unparsed += t.column("parsed").to_pylist().count(False)
    return dict(sorted(counts.items())), unparsed


def reading_rule(r: Rubric) -> str:
    """How the rubric turns the judge's answer into a label, in words (the manifest's)."""
    if r.reading == "one_token":
        return (
            "greedy, one free token; the label whose lowercase equals the stripped, lowercased "
            f"text, else {r.fallback!r} (parsed = false)"
        )
    if r.reading == "first_line":
        return (
            f"greedy, free text up to {r.max_tokens} tokens; the label equal to the first line "
            f"of the stripped text, else {r.fallback!r} (parsed = false); the raw text keeps "
            "the rest (Llama Guard's categories)"
        )
    return (
        f"greedy, constrained to up to {CHOICE_WHITESPACE} whitespace characters then one label "
        f"(vLLM structured outputs, regex, {GRAMMAR_BACKEND}); the stripped text is the label"
    )


def score_rule(r: Rubric) -> str:
    """What the probabilities are, in words (the manifest's)."""
    where = (
        "the one answer token"
        if r.reading == "one_token"
        else "the decision position (the first answer token that is not whitespace)"
    )
    score = f"; score = P({r.score_label!r})" if r.score_label else "; no score label"
    return (
        f"probs = P(label) at {where}, summed over the label's token variants among the top "
        f"{TOP_LOGPROBS} log-probs (a lower bound; see rotserve.judge.verdict){score}"
    )


def verdict_manifest(
    resolved: ResolvedJudge, previous: dict[str, Any] | None, argv: list[str] | None
) -> dict[str, Any]:
    r, c = resolved.rubric, resolved.config
    previous = previous or {}
    return {
        "format": VERDICT_FORMAT,
        "run_id": resolved.run_id,
        "verdict_id": resolved.verdict_id,
        "name": resolved.name,
        "status": "running",
        "created": previous.get("created", now()),
        "command": argv,
        "config": config_dict(c),
        "judge": {
            "model": resolved.judge,
            "model_is_local": resolved.judge_is_local,
            "revision": c.revision,
            "context": resolved.context,
            "content": resolved.shape,  # message contents its chat template renders
        },
        "rubric": {
            "name": r.name,
            "labels": list(r.labels),
            "axis": r.axis_map,  # label -> its place on the shared axis (rotserve.judge.axis)
            "template": r.template,
            "chat": r.chat,
            "conversation": r.conversation,
            "description": r.description,
            "reading": r.reading,
            "fallback": r.fallback,
            "score_label": r.score_label,
            "clip_tokens": r.clip_tokens,
            "fingerprint": r.fingerprint(),
        },
        # How a verdict is made, in words: the rules before the judge, and its reading.
        "rules": {
            "short_response": r.rule,
            "clip": r.clip_rule,
            "truncation": TRUNCATION_RULE,
            "reading": reading_rule(r),
            "probabilities": score_rule(r),
        },
        "counts": {
            "rows": resolved.plan.n_rows,
            "judged": resolved.plan.n_rows - resolved.n_rule,
            "by_rule": resolved.n_rule,
            "truncated": resolved.n_truncated,
            "clipped": resolved.n_clipped,
            "unparsed": None,  # counted when the table is complete
        },
        "canary": canary_record(resolved),
        "identity": resolved.identity(),
        "plan": {
            "fingerprint": resolved.plan.fingerprint,
            "shard_size": c.shard_size,
            "shards": len(resolved.plan.shards),
        },
        "rows": {"expected": resolved.plan.n_rows, "written": None},
        "schema": [
            {"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in VERDICT_SCHEMA
        ],
        **provenance(),
        "attempts": list(previous.get("attempts", [])),
    }


def judge_worker_spec(r: ResolvedJudge, where: Placement) -> JudgeWorkerSpec:
    """The spec of every judge actor at a placement: the stock judge engine, its context
    length, and the verdicts' constants."""
    c = r.config
    log(f"judge engines: {choose_dtype(c.dtype, gpu=where.use_gpu).describe()}")
    engine = engine_spec(
        where,
        r.judge,
        dtype=c.dtype,
        enforce_eager=c.enforce_eager,
        revision=c.revision,
        llm_kwargs={
            "max_model_len": r.context,
            "structured_outputs_config": {"backend": GRAMMAR_BACKEND},
        },
    )
    verdicts = VerdictContext(run_id=r.run_id, judge=r.judge, rubric=r.rubric)
    return JudgeWorkerSpec(engine, verdicts, r.canary)
