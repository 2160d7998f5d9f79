"""What a judge run is: the typed request, and its validation before Ray or vLLM start.

JudgeConfig is what the user asked for; `resolve()` checks every input (the run directory and
its rows, the rubric, the judge model and its tokenizer, every row's prompt against the
judge's context) and returns a ResolvedJudge with the plan's items and the table's identity,
so each bad input is a clear JudgeConfigError in seconds, not a traceback after an engine start.
It also builds the judge canary's prompts (rotserve.judge.anchors) with the very function that
builds the rows' (`item_of`), so the anchors reach the judge exactly as a row does.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rotserve.dtype import DTYPES
from rotserve.fanout import ExecutionConfigError, ExecutionOptions
from rotserve.judge.anchors import AnchorError, CanarySpec, anchors_for
from rotserve.judge.plan import JudgeItem, JudgePlan, make_judge_plan
from rotserve.judge.prompts import (
    ContextError,
    PromptShapeError,
    judge_input,
    prompt_shape,
    short_by_rule,
)
from rotserve.judge.rubrics import Rubric, RubricError, load_rubric
from rotserve.judge.verdict import TOP_LOGPROBS, choice_regex
from rotserve.paths import ModelPathError, resolve_model, toy_judge_dir
from rotserve.rundir import (
    MANIFEST,
    ROWS_DIR,
    VERDICT_FORMAT,
    RunDirError,
    read_manifest,
    read_rows,
    row_keys,
)

DEFAULT_SHARD_SIZE = 256  # rows per generate() call and per verdict part file
MAX_DEFAULT_CONTEXT = 8192  # the judge's context unless --max-model-len: rows fit well within


class JudgeConfigError(ValueError):
    """A judge request that cannot run; the message says which input and what to do."""


class JudgeCanaryError(JudgeConfigError):
    """The judge failed its canary (rotserve.judge.anchors): it cannot do this rubric's job.
    Raised in a judge engine's actor as it starts, and again by the driver with the answers."""


@dataclass(frozen=True)
class JudgeConfig:
    """One judge request. Defaults: the shipped toy judge with the `behaviour` rubric."""

    run_dir: str
    judge: str = field(default_factory=lambda: str(toy_judge_dir()))
    rubric: str = "behaviour"
    labels: str | None = None  # for a rubric template file: "a,b,c"
    name: str | None = None  # the verdict table's name; None: <judge slug>.<rubric>
    revision: str | None = None
    dtype: str = "auto"
    enforce_eager: bool = False
    max_model_len: int | None = None  # None: the judge's max positions, at most 8192
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    # the judge canary (rotserve.judge.anchors): never in the id, always in the manifest
    skip_canary: bool = False  # do not run it
    accept_canary_failure: bool = False  # run it, record a failure, judge anyway
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)  # never in the id


@dataclass(frozen=True)
class ResolvedJudge:
    config: JudgeConfig
    run_dir: Path
    run_id: str
    run_manifest: dict[str, Any]
    judge: str  # absolute directory or hub id
    judge_is_local: bool
    rubric: Rubric
    context: int
    name: str
    plan: JudgePlan
    n_rule: int  # rows labelled by the rubric's short-response rule
    n_truncated: int
    shape: str = "string"  # message contents the judge's chat template renders (prompts.SHAPES)
    n_clipped: int = 0  # generations the rubric's clip cut
    canary: CanarySpec | None = None  # None: skipped, or the rubric has no anchors
    canary_note: str = ""  # why there is no canary

    def identity(self) -> dict[str, Any]:
        """Everything that determines the verdicts; its hash is the table's verdict id."""
        c = self.config
        return {
            "format": VERDICT_FORMAT,
            "run_id": self.run_id,
            "judge": self.judge,
            "revision": c.revision,
            "rubric": self.rubric.name,
            "rubric_fingerprint": self.rubric.fingerprint(),
            "dtype": c.dtype,
            "enforce_eager": c.enforce_eager,
            "context": self.context,
            "top_logprobs": TOP_LOGPROBS,
            "plan": self.plan.fingerprint,
        }

    @property
    def verdict_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def judge_slug(judge: str) -> str:
    """A table-name-safe short name of a judge: a directory's name, or org--name of a hub id."""
    base = Path(judge).name if Path(judge).is_dir() else judge.replace("/", "--")
    return re.sub(r"[^\w.-]+", "-", base).strip(".-") or "judge"


def resolve(config: JudgeConfig, log: Any = None) -> ResolvedJudge:
    """Check every input and build the plan; JudgeConfigError on the first problem."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    _check_numbers(config)
    run_dir = Path(config.run_dir).expanduser().resolve()
    manifest = _run_manifest(run_dir)
    rows = read_rows(run_dir)
    if rows.num_rows == 0:
        raise JudgeConfigError(
            f"{run_dir} has no rows (no part files in {run_dir / ROWS_DIR}): run the grid first"
        )
    expected = (manifest.get("rows") or {}).get("expected")
    if manifest.get("status") != "complete" or rows.num_rows != expected:
        raise JudgeConfigError(
            f"{run_dir} is not a complete run ({rows.num_rows} of {expected} rows, status "
            f"{manifest.get('status')!r}): rerun its grid command to finish it, then judge it"
        )
    try:
        rubric = load_rubric(config.rubric, config.labels)
    except RubricError as e:
        raise JudgeConfigError(f"--rubric {config.rubric}: {e}") from None
    try:
        judge, is_local = resolve_model(config.judge, flag="--judge")
    except ModelPathError as e:
        raise JudgeConfigError(str(e)) from None
    tokenizer, max_positions = _load_judge(judge, config.revision)
    context = config.max_model_len or min(max_positions or MAX_DEFAULT_CONTEXT, MAX_DEFAULT_CONTEXT)
    if max_positions and context > max_positions:
        raise JudgeConfigError(
            f"--max-model-len {context} is more than the judge's {max_positions} positions"
        )
    shape = _check_prompt(rubric, tokenizer, judge)
    log(f"judge: building {rows.num_rows} prompts for {judge_slug(judge)} ({rubric.name})")
    items, n_clipped = _items(rows, rubric, tokenizer, context, shape, config.execution.progress)
    canary, canary_note = _canary(config, rubric, tokenizer, context, shape)
    name = config.name or f"{judge_slug(judge)}.{rubric.name}"
    if not re.fullmatch(r"[\w][\w.-]*", name):
        raise JudgeConfigError(f"--name {name!r}: letters, digits, '.', '-' and '_' only")
    return ResolvedJudge(
        config=config,
        run_dir=run_dir,
        run_id=str(manifest["run_id"]),
        run_manifest=manifest,
        judge=judge,
        judge_is_local=is_local,
        rubric=rubric,
        context=context,
        name=name,
        plan=make_judge_plan(items, config.shard_size),
        n_rule=sum(it.rule_label is not None for it in items),
        n_truncated=sum(it.truncated for it in items),
        shape=shape,
        n_clipped=n_clipped,
        canary=canary,
        canary_note=canary_note,
    )


def _canary(
    config: JudgeConfig, rubric: Rubric, tokenizer: Any, context: int, shape: str
) -> tuple[CanarySpec | None, str]:
    """The canary every judge engine runs first: the rubric's anchors, built as rows are."""
    if config.skip_canary:
        return None, "skipped (--skip-judge-canary)"
    try:
        anchors = anchors_for(rubric)
    except AnchorError as e:
        raise JudgeConfigError(f"--rubric {config.rubric}: {e}") from None
    if not anchors:
        return None, f"rubric {rubric.name!r} ships no anchors (a rubric file may: [[anchors]])"
    items = []
    for a in anchors:
        try:
            item, _ = item_of(
                rubric, tokenizer, a.row_key, a.instruction, a.generation, context, shape
            )
        except ContextError as e:
            raise JudgeConfigError(f"anchor {a.id} of rubric {rubric.name!r}: {e}") from None
        items.append(item)
    return CanarySpec(tuple(anchors), tuple(items), config.accept_canary_failure), ""


def _check_prompt(rubric: Rubric, tokenizer: Any, judge: str) -> str:
    """The judge prompt must show the row (prompts.prompt_shape), and a choice rubric's
    constraint must compile in the grammar backend the judge engine uses (xgrammar)."""
    try:
        shape = prompt_shape(rubric, tokenizer)
    except PromptShapeError as e:
        raise JudgeConfigError(f"--judge {judge}: {e}") from None
    if rubric.reading == "choice":
        try:
            import xgrammar
        except ImportError:  # no vLLM here: the engine's own check remains
            return shape
        try:
            xgrammar.Grammar.from_regex(choice_regex(rubric.labels))
        except Exception as e:
            raise JudgeConfigError(
                f"rubric {rubric.name!r}: its labels {list(rubric.labels)} do not make a "
                f"constraint the judge engine can compile ({e}); use plainer labels"
            ) from None
    return shape


def _check_numbers(c: JudgeConfig) -> None:
    checks = [
        (c.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}"),
        (c.shard_size >= 1, f"--shard-size must be at least 1, got {c.shard_size}"),
        (
            not (c.skip_canary and c.accept_canary_failure),
            "--skip-judge-canary and --accept-judge-canary-failure contradict each other: skip "
            "the canary, or run it and accept its failure",
        ),
        (
            c.max_model_len is None or c.max_model_len >= 16,
            f"--max-model-len must be at least 16, got {c.max_model_len}",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise JudgeConfigError(msg)
    try:
        c.execution.check()
    except ExecutionConfigError as e:
        raise JudgeConfigError(str(e)) from None


def _run_manifest(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise JudgeConfigError(f"RUN_DIR {run_dir}: no such directory")
    try:
        manifest = read_manifest(run_dir)
    except RunDirError as e:
        raise JudgeConfigError(str(e)) from None
    if manifest is None or "run_id" not in manifest:
        raise JudgeConfigError(
            f"{run_dir} holds no grid {MANIFEST}: not a run directory (give the directory "
            "`rotserve grid` wrote, e.g. runs/grid-<run id>)"
        )
    return manifest


def _load_judge(judge: str, revision: str | None) -> tuple[Any, int | None]:
    """The judge's tokenizer and max positions, read with transformers (no remote code)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(judge, revision=revision)
        cfg = AutoConfig.from_pretrained(judge, revision=revision)
    except Exception as e:  # missing files, unknown architecture, no network for a hub id
        raise JudgeConfigError(f"--judge {judge}: cannot load its tokenizer/config: {e}") from None
    text_cfg = getattr(cfg, "text_config", None) or cfg
    return tokenizer, getattr(text_cfg, "max_position_embeddings", None)


def _items(
    rows: Any, rubric: Rubric, tokenizer: Any, context: int, shape: str, progress: bool = False
) -> tuple[list[JudgeItem], int]:
    """Every row's item, and how many generations the rubric's clip cut."""
    from tqdm import tqdm

    keys = row_keys(rows)
    cols = zip(
        rows.column("instruction").to_pylist(),
        rows.column("generation").to_pylist(),
        keys,
        strict=True,
    )
    items, n_clipped = [], 0
    # ~1 ms a row (chat template + tokenizer): a bar for runs large enough to wait on
    bar = tqdm(
        cols,
        total=rows.num_rows,
        desc="judge prompts",
        unit="row",
        disable=not progress or rows.num_rows < 5000,
        file=sys.stderr,
    )
    for instruction, generation, key in bar:
        try:
            item, clipped = item_of(rubric, tokenizer, key, instruction, generation, context, shape)
        except ContextError as e:
            raise JudgeConfigError(f"row {key}: {e}") from None
        items.append(item)
        n_clipped += clipped
    return items, n_clipped


def item_of(
    rubric: Rubric,
    tokenizer: Any,
    key: str,
    instruction: str,
    generation: str,
    context: int,
    shape: str,
) -> tuple[JudgeItem, bool]:
    """One row's judge item (the rubric's rule, or its prompt clipped and fitted to the context)
    and whether the clip cut it: the one request building of rows and anchors alike."""
    if short_by_rule(rubric, generation):
        return JudgeItem.of(key, (), False, rubric.short_label), False
    inp = judge_input(rubric, tokenizer, instruction, generation, context, shape)
    return JudgeItem.of(key, inp.token_ids, inp.truncated), inp.clipped


def config_dict(config: JudgeConfig) -> dict[str, Any]:
    return asdict(config)
