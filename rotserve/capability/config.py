"""What a capability run is: the typed request, and its validation before Ray or vLLM start.

CapabilityConfig is what the user asked for. `resolve()` checks every input and returns a
ResolvedCapability with the settings, the loaded tasks, every engine request and the plan, so
each bad input (a run that lacks the settings asked for, an unknown task, a task file that does
not parse) is a clear CapabilityConfigError in seconds, never a traceback after an engine start.

The settings are the grid's (rotserve.grid.plan.Condition: angle, mask, plane, window, or the
unsteered baseline), from one of two places:
- a grid run directory: every setting of its manifest plus the baseline, or the subset asked
  for (`--angle-list`, `--mask`, `--plane NAME`, `--layers`), each of which the run must have;
- the command line (`--model`, `--plane`, `--angles`/`--angle-list`, `--mask`, `--layers`), read
  and checked by the grid's own resolve step, so the flags mean what they mean to `rotserve grid`.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rotserve.capability.plan import CapabilityPlan, make_capability_plan, setting_key
from rotserve.capability.tasks import (
    DEFAULT_MAX_LENGTH,
    EvalOptions,
    LoadedTasks,
    Recorded,
    TaskError,
    load_tasks,
    record_requests,
)
from rotserve.dtype import DTYPES
from rotserve.fanout import ExecutionConfigError, ExecutionOptions
from rotserve.grid.config import (
    MASKS,
    GridConfig,
    GridConfigError,
    ResolvedGrid,
    normalize_angles,
)
from rotserve.grid.config import resolve as resolve_grid
from rotserve.grid.plan import Condition, conditions
from rotserve.paths import shipped_tasks_dir
from rotserve.rundir import DEFAULT_PLANE, MANIFEST, RunDirError, read_manifest
from rotserve.steering import RequestSteeringError, canonical_window

DEFAULT_SHARD_SIZE = 512  # (request, setting) units per generate call and per answer part
NAME_PATTERN = r"[\w][\w.+-]*"


class CapabilityConfigError(ValueError):
    """A capability request that cannot run; the message says which input and what to do."""


@dataclass(frozen=True)
class CapabilityConfig:
    """One capability request: lm-eval tasks at every steering setting of a grid run
    (`run_dir`), or at settings given here for a model (`model`, `plane`/`planes`, `angles`,
    `mask`, `windows`, `baseline`).

    With a run, `angles`, `mask`, `plane_names` and `windows` select among the run's settings
    (None or empty: all of them), and `dtype`/`enforce_eager` default to the run's."""

    tasks: tuple[str, ...]
    run_dir: str | None = None
    include_paths: tuple[str, ...] = ()  # task YAML folders or files, beside lm-eval's own
    limit: float | None = None  # documents per task (a fraction if < 1), as lm-eval's --limit
    num_fewshot: int | None = None  # None: each task's own
    apply_chat_template: bool = False
    max_length: int | None = None  # None: min(2048, the model's max positions), as lm-eval's
    bootstrap_iters: int = 100000
    # the settings: a model's (no run) or a selection of the run's
    model: str | None = None
    revision: str | None = None
    plane: str | None = None  # one plane file (no run); None: the model's own plane.safetensors
    planes: tuple[tuple[str, str], ...] = ()  # (name, file) swept (no run)
    plane_names: tuple[str, ...] = ()  # with a run: its planes to evaluate, by name
    windows: tuple[str, ...] = ()
    angles: tuple[float, ...] | None = None  # None: the run's, or the grid's default 36
    mask: str | None = None  # plain | adaptive | both; None: the run's, or plain
    baseline: bool = True  # also evaluate the unsteered model
    dtype: str | None = None  # None: the run's, or auto
    enforce_eager: bool | None = None  # None: the run's, or False
    # output and execution
    shard_size: int = DEFAULT_SHARD_SIZE
    name: str | None = None  # the table's name; None: the task names joined with "+"
    out: str | None = None  # no run: the directory to write (default runs/capability-<id>)
    overwrite: bool = False
    verbose_tasks: bool = False  # lm-eval's own logging and bars
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)  # never in the id


@dataclass(frozen=True)
class ResolvedCapability:
    config: CapabilityConfig
    grid: ResolvedGrid  # model and planes, checked by the grid's resolve step
    run_id: str | None  # the grid run's id; None for settings given on the command line
    root: Path  # the directory that gets capability/<name>/
    settings: tuple[Condition, ...]
    loaded: LoadedTasks
    recorded: Recorded
    options: EvalOptions
    plan: CapabilityPlan
    tokenizer: Any
    name: str

    @property
    def model(self) -> str:
        return self.grid.model

    def identity(self) -> dict[str, Any]:
        """Everything that determines the answers; its hash is the capability id. What only
        changes the scoring (metrics, filters, bootstrap) is recorded in the manifest instead,
        and a rerun rescores the answers on disk with it."""
        c = self.grid.config
        return {
            "run_id": self.run_id,
            "model": self.grid.model,
            "revision": c.revision,
            "planes": [list(p) for p in self.grid.plane_shas],
            "settings": [setting_key(s) for s in self.settings],
            "selective": [list(p) for p in self.grid.selective],
            "plan": self.plan.fingerprint,
            "dtype": c.dtype,
            "enforce_eager": c.enforce_eager,
        }

    @property
    def capability_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def resolve(config: CapabilityConfig, log: Any = None) -> ResolvedCapability:
    """Check every input, build every request and the plan; CapabilityConfigError on the first
    problem. Reads files, the tokenizer and the tasks' data: no Ray, no vLLM."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    _check_numbers(config)
    if config.run_dir is not None:
        grid, run_id, run_dir = _from_run(config)
        root = run_dir
    else:
        grid, run_id, root = _from_command_line(config), None, None
    settings = _settings(config, grid)
    # The shipped tasks first: a user's task of the same name overrides them.
    shipped = [str(shipped_tasks_dir())] if shipped_tasks_dir().is_dir() else []
    log(f"capability: loading lm-eval task(s) {', '.join(config.tasks)}")
    try:
        loaded = load_tasks(config.tasks, [*shipped, *config.include_paths])
    except TaskError as e:
        raise CapabilityConfigError(str(e)) from None
    tokenizer, positions = _load_tokenizer(grid.model, grid.config.revision)
    max_length = config.max_length or min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    if positions and max_length > positions:
        raise CapabilityConfigError(
            f"--max-length {max_length} is more than the model's {positions} positions"
        )
    options = EvalOptions(
        limit=config.limit,
        num_fewshot=config.num_fewshot,
        apply_chat_template=config.apply_chat_template,
        max_length=max_length,
        bootstrap_iters=config.bootstrap_iters,
        verbose=config.verbose_tasks,
    )
    try:
        recorded = record_requests(loaded, tokenizer, options)
    except TaskError as e:
        raise CapabilityConfigError(str(e)) from None
    _check_fits(recorded, max_length)
    plan = make_capability_plan(recorded.requests, settings, config.shard_size)
    name = config.name or default_name(loaded.names)
    if not re.fullmatch(NAME_PATTERN, name):
        raise CapabilityConfigError(
            f"--name {name!r}: letters, digits, '.', '+', '-' and '_' only (it names a folder)"
        )
    resolved = ResolvedCapability(
        config=config,
        grid=grid,
        run_id=run_id,
        root=root or Path("."),
        settings=settings,
        loaded=loaded,
        recorded=recorded,
        options=options,
        plan=plan,
        tokenizer=tokenizer,
        name=name,
    )
    if root is None:  # settings from the command line: runs/capability-<id> unless --out
        out = config.out or str(Path("runs") / f"capability-{resolved.capability_id}")
        resolved = replace(resolved, root=Path(out).expanduser().resolve())
    return resolved


def default_name(names: tuple[str, ...]) -> str:
    """The task names joined with "+", or the first and a count when that gets long."""
    joined = "+".join(names)
    if len(joined) <= 64:
        return joined
    return f"{names[0][:48]}+{len(names) - 1}-more"


def _check_numbers(c: CapabilityConfig) -> None:
    checks = [
        (bool(c.tasks), "no tasks: give --tasks NAME[,NAME...] (lm-eval task names)"),
        (
            (c.run_dir is None) != (c.model is None),
            "give a grid run directory (RUN_DIR) or --model with settings, not both"
            if c.run_dir is not None
            else "give a grid run directory (RUN_DIR), or --model (with --plane and angles) for "
            "settings of your own",
        ),
        (c.shard_size >= 1, f"--shard-size must be at least 1, got {c.shard_size}"),
        (
            c.limit is None or c.limit > 0,
            f"--limit must be > 0 (documents per task, or a fraction < 1), got {c.limit}",
        ),
        (
            c.num_fewshot is None or c.num_fewshot >= 0,
            f"--num-fewshot must be >= 0, got {c.num_fewshot}",
        ),
        (
            c.max_length is None or c.max_length >= 16,
            f"--max-length must be at least 16, got {c.max_length}",
        ),
        (c.bootstrap_iters >= 0, f"--bootstrap-iters must be >= 0, got {c.bootstrap_iters}"),
        (
            c.dtype is None or c.dtype in DTYPES,
            f"--dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}",
        ),
        (
            c.mask is None or c.mask in MASKS,
            f"--mask must be one of {', '.join(MASKS)}, got {c.mask!r}",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise CapabilityConfigError(msg)
    if c.run_dir is not None and (c.plane is not None or c.planes or c.out or c.revision):
        raise CapabilityConfigError(
            "with RUN_DIR the model, planes and output are the run's: --plane NAME selects "
            "among its planes by name; --revision and --out are for --model only"
        )
    if c.run_dir is None and c.plane_names:
        raise CapabilityConfigError("plane names select among a run's planes: give RUN_DIR")
    try:
        c.execution.check()
    except ExecutionConfigError as e:
        raise CapabilityConfigError(str(e)) from None


def _grid_config(**kw: Any) -> GridConfig:
    """The GridConfig whose resolve step checks the model and planes of these settings (the
    grid's defaults for what is None)."""
    fields = {k: v for k, v in kw.items() if v is not None}
    return GridConfig(**fields)


def _resolve_grid(cfg: GridConfig, where: str) -> ResolvedGrid:
    try:
        return resolve_grid(cfg)
    except GridConfigError as e:
        raise CapabilityConfigError(f"{where}{e}") from None


def _from_command_line(c: CapabilityConfig) -> ResolvedGrid:
    cfg = _grid_config(
        model=c.model,
        revision=c.revision,
        plane=c.plane,
        planes=c.planes or None,
        windows=c.windows or None,
        angles=c.angles,
        mask=c.mask,
        dtype=c.dtype,
        enforce_eager=c.enforce_eager,
    )
    return _resolve_grid(cfg, "")


def _from_run(c: CapabilityConfig) -> tuple[ResolvedGrid, str, Path]:
    """The run's model and planes, checked again (files may have moved or changed since)."""
    run_dir = Path(c.run_dir or "").expanduser().resolve()
    if not run_dir.is_dir():
        raise CapabilityConfigError(f"RUN_DIR {run_dir}: no such directory")
    try:
        m = read_manifest(run_dir)
    except RunDirError as e:
        raise CapabilityConfigError(str(e)) from None
    if m is None or "run_id" not in m or "resolved" not in m:
        raise CapabilityConfigError(
            f"{run_dir} holds no grid {MANIFEST}: not a run directory (give the directory "
            "`rotserve grid` wrote, e.g. runs/grid-<run id>), or use --model for settings of "
            "your own"
        )
    run_cfg, res = m.get("config") or {}, m["resolved"]
    planes = [(p["name"], p["path"]) for p in m.get("planes") or []]
    if not planes and (m.get("plane") or {}).get("path"):  # runs from before plane sweeps
        planes = [(DEFAULT_PLANE, m["plane"]["path"])]
    sweep = bool(run_cfg.get("planes"))
    eager = run_cfg.get("enforce_eager", False) if c.enforce_eager is None else c.enforce_eager
    cfg = _grid_config(
        model=res["model"],
        revision=res.get("revision"),
        plane=None if sweep else planes[0][1],
        planes=tuple(planes) if sweep else None,
        windows=tuple(m.get("windows") or ()) or None,
        angles=tuple(res.get("angles") or ()),
        mask=run_cfg.get("mask", run_cfg.get("mode", "plain")),
        baseline=True,
        dtype=c.dtype or run_cfg.get("dtype"),
        enforce_eager=eager,
    )
    if not cfg.angles and not cfg.baseline:
        raise CapabilityConfigError(f"run {m['run_id']} has no angles")
    grid = _resolve_grid(cfg, f"run {m['run_id']} ({run_dir}): ")
    recorded = {p["name"]: p.get("sha256") for p in m.get("planes") or []}
    for name, sha in grid.plane_shas:
        if recorded.get(name) not in (None, sha):
            raise CapabilityConfigError(
                f"run {m['run_id']}: plane {name!r} ({dict(planes)[name]}) has changed since the "
                "run (its sha256 differs from the manifest's): the run's settings cannot be "
                "evaluated with another plane; restore the file or use --model with this plane"
            )
    return grid, str(m["run_id"]), run_dir


def _settings(c: CapabilityConfig, grid: ResolvedGrid) -> tuple[Condition, ...]:
    """The settings to evaluate: with a run, its own (all, or the subset asked for)."""
    masks = grid.config.adaptive_masks
    planes, windows, angles = grid.plane_names, grid.windows, grid.angles
    if c.run_dir is not None:
        who = "the run"
        if c.angles is not None:
            asked = _angles(c.angles)
            missing = [a for a in asked if a not in angles]
            if missing:
                raise CapabilityConfigError(
                    f"{who} has no angle {', '.join(f'{a:g}°' for a in missing)} (its "
                    f"angles: {', '.join(f'{a:g}' for a in angles)}); ask for a subset of them, "
                    "or use --model for settings of your own"
                )
            angles = asked
        if c.mask is not None:
            asked_masks = GridConfig(mask=c.mask).adaptive_masks
            missing_masks = [m for m in asked_masks if m not in masks]
            if missing_masks:
                have = ", ".join("adaptive" if m else "plain" for m in masks)
                raise CapabilityConfigError(
                    f"{who} has no {c.mask} mask (its masks: {have}); ask for one it has"
                )
            masks = asked_masks
        if c.plane_names:
            unknown = [p for p in c.plane_names if p not in planes]
            if unknown:
                raise CapabilityConfigError(
                    f"{who} has no plane {', '.join(map(repr, unknown))} (its planes: "
                    f"{', '.join(planes)}); --plane with RUN_DIR names one of the run's planes"
                )
            planes = tuple(p for p in planes if p in c.plane_names)
        if c.windows:
            asked_windows = [_window(w) for w in c.windows]
            unknown = [w for w in asked_windows if w not in windows]
            if unknown:
                raise CapabilityConfigError(
                    f"{who} has no layer window {', '.join(unknown)} (its windows: "
                    f"{', '.join(windows)})"
                )
            windows = tuple(w for w in windows if w in asked_windows)
    settings = conditions(angles, masks, c.baseline, planes, windows)
    if not settings:
        raise CapabilityConfigError("nothing to evaluate: no angles and --no-baseline")
    return settings


def _angles(angles: tuple[float, ...]) -> tuple[float, ...]:
    try:
        return normalize_angles(angles)
    except GridConfigError as e:
        raise CapabilityConfigError(str(e)) from None


def _window(raw: str) -> str:
    if raw.strip().lower() == "selective":
        return "selective"
    try:
        return canonical_window(raw, "--layers")
    except RequestSteeringError as e:
        raise CapabilityConfigError(f"--layers {raw}: {e}") from None


def _load_tokenizer(model: str, revision: str | None) -> tuple[Any, int | None]:
    """The model's tokenizer (as lm-eval's huggingface backend loads it) and max positions."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, use_fast=True)
        cfg = AutoConfig.from_pretrained(model, revision=revision)
    except Exception as e:
        raise CapabilityConfigError(f"model {model}: cannot load its tokenizer: {e}") from None
    text = cfg.get_text_config()
    return tokenizer, getattr(text, "max_position_embeddings", None)


def _check_fits(recorded: Recorded, max_length: int) -> None:
    """A loglikelihood continuation must leave at least one context token (lm-eval's API models
    assert it); say so now rather than in an engine."""
    for r in recorded.requests:
        if r.n_continuation and r.n_continuation >= r.n_tokens:
            raise CapabilityConfigError(
                f"a continuation of {r.n_continuation} tokens does not fit --max-length "
                f"{max_length} with any context; raise --max-length"
            )


def config_dict(config: CapabilityConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))
