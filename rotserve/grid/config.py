"""What a grid run is: the typed configuration, angle parsing, and validation before any engine.

Two layers:
- GridConfig: what the user asked for, as typed values (the CLI builds one; Python callers too).
- ResolvedGrid: the same request with every path made absolute, the files read and checked
  (model and plane through rotserve.steering, the set-up path every engine takes; prompt
  sets; output directory) and a run id derived from
  everything that determines the rows. `resolve()` builds it without starting Ray or vLLM,
  so every bad input is a clear GridConfigError in a second, not a traceback after an engine
  spent 15 s starting.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rotserve.dtype import DTYPES
from rotserve.fanout import ExecutionConfigError, ExecutionOptions
from rotserve.paths import (
    PLANE_FILENAME,
    ModelPathError,
    default_prompts,
    resolve_model,
    toy_model_dir,
)
from rotserve.plane import Plane, PlaneError, file_sha256, selective_layers
from rotserve.prompts import Prompt, PromptFileError, load_prompts
from rotserve.rundir import ALL_LAYERS, DEFAULT_PLANE, is_default_setting
from rotserve.steering import (
    ModelInfo,
    RequestSteeringError,
    RotServeConfigError,
    SteeringSetup,
    UnsupportedArchitectureError,
    canonical_window,
    prepare_steering,
    window_layers,
)

DEFAULT_ANGLE_COUNT = 36  # the reference grid: 0..350 step 10
DEFAULT_MAX_TOKENS = 32  # the toy answers or refuses within its first ~10 tokens
DEFAULT_SHARD_SIZE = 256  # prompts × conditions per generate() call (× samples per prompt rows)
MASKS = ("plain", "adaptive", "both")


class GridConfigError(ValueError):
    """A grid request that cannot run; the message says which input and what to do."""


# --- angles ----------------------------------------------------------------------------------


def evenly_spaced(count: int) -> tuple[float, ...]:
    """`count` angles in degrees, evenly spaced from 0°: 4 -> (0, 90, 180, 270)."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise GridConfigError(f"the angle count must be a whole number, got {count!r}")
    if count < 1:
        raise GridConfigError(
            f"the angle count must be at least 1, got {count}; "
            "use --no-baseline with --angle-list for specific angles, or --angles 36 for 10° steps"
        )
    return tuple(360.0 * i / count for i in range(count))


def parse_angle_count(text: str) -> int:
    """`--angles N`: a positive whole number (no '3.5', no '-2', no '0')."""
    try:
        count = int(text.strip())
    except ValueError:
        raise GridConfigError(
            f"--angles takes a whole number of evenly spaced angles, got {text!r}; "
            "for specific angles use --angle-list 0,90,180"
        ) from None
    evenly_spaced(count)  # range check, same message as the Python API
    return count


def normalize_angles(angles: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Angles folded into [0°, 360°), order kept; duplicates are an error (they double rows)."""
    out: list[float] = []
    for a in angles:
        a = float(a)
        if not math.isfinite(a):
            raise GridConfigError(f"angle {a} is not a finite number of degrees")
        folded = a % 360.0
        folded = 0.0 if folded == 360.0 else folded  # -1e-17 % 360 rounds to 360.0
        if folded in out:
            raise GridConfigError(
                f"angle {a:g}° appears twice in the grid (as {folded:g}°): every angle once, "
                "or the same rows would be generated twice"
            )
        out.append(folded)
    if not out:
        raise GridConfigError("the angle list is empty; give at least one angle")
    return tuple(out)


def parse_angle_list(text: str) -> tuple[float, ...]:
    """`--angle-list 0,90,180`: degrees separated by commas."""
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise GridConfigError("--angle-list is empty; give degrees like 0,90,180,270")
    values = []
    for p in parts:
        if not p:
            raise GridConfigError(f"--angle-list {text!r} has an empty item (two commas in a row?)")
        try:
            values.append(float(p))
        except ValueError:
            raise GridConfigError(f"--angle-list item {p!r} is not a number of degrees") from None
    return normalize_angles(values)


def parse_prompt_set(text: str) -> tuple[str, str]:
    """`--prompts label=FILE` (or just FILE: the label is the file's stem)."""
    label, sep, path = text.partition("=")
    if not sep:
        label, path = Path(text).stem, text
    label, path = label.strip(), path.strip()
    if not label or not path:
        raise GridConfigError(f"--prompts takes label=FILE, got {text!r}")
    return label, path


# --- the request -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GridConfig:
    """One grid request. Defaults give the embedded demo: toy model, its plane, both prompt sets.

    Fields that change the rows (model .. shard_size) go into the run id; the others
    (engines, Ray address, out, ...) only say how to execute, so a run can be resumed with,
    say, more engines.
    """

    model: str = field(default_factory=lambda: str(toy_model_dir()))
    revision: str | None = None  # HF revision, for hub ids
    plane: str | None = None  # None: <model>/plane.safetensors
    # Several planes swept in one run (name, file); when given, `plane` must be None.
    planes: tuple[tuple[str, str], ...] = ()
    # Layer windows swept ("all", "a:b", "3,4,5"); () = every layer (as "all").
    windows: tuple[str, ...] = ()
    prompts: tuple[tuple[str, str], ...] = field(
        default_factory=lambda: tuple((k, str(v)) for k, v in default_prompts().items())
    )
    column: str | None = None  # instruction column; None: load_prompts' auto-detection
    angles: tuple[float, ...] = field(default_factory=lambda: evenly_spaced(DEFAULT_ANGLE_COUNT))
    baseline: bool = True  # also generate unsteered rows (angle null)
    mask: str = "plain"  # which tokens rotate: plain (all) | adaptive (h·b1 > 0) | both
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    seed: int = 0
    samples_per_prompt: int = 1
    coherence: bool = True  # nll/perplexity of every generation under the unsteered model
    dtype: str = "auto"
    enforce_eager: bool = False  # no torch.compile / CUDA graphs: faster start, slower steps
    shard_size: int = DEFAULT_SHARD_SIZE
    # output and execution only: never in the run id
    out: str | None = None  # None: runs/grid-<run id>
    overwrite: bool = False
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    @property
    def adaptive_masks(self) -> tuple[bool, ...]:
        """The `adaptive` values of the rows: plain (False), adaptive (True) or both."""
        return {"plain": (False,), "adaptive": (True,), "both": (False, True)}[self.mask]


@dataclass(frozen=True)
class PromptSet:
    label: str
    path: Path
    sha256: str
    prompts: tuple[Prompt, ...]


@dataclass(frozen=True)
class ResolvedGrid:
    """A validated request: absolute paths, loaded inputs, run id. Built before Ray starts."""

    config: GridConfig
    model: str  # absolute path of a local model directory, or the HF id
    model_is_local: bool
    steering: SteeringSetup  # the checked model x plane, as the engines will load them
    plane_sha256: str
    prompt_sets: tuple[PromptSet, ...]
    angles: tuple[float, ...]
    run_id: str
    out: Path
    plane_shas: tuple[tuple[str, str], ...] = ()  # (name, sha256) of every plane, slot order
    windows: tuple[str, ...] = ("all",)  # canonical layer windows (and "selective")
    # "selective" per plane: (name, canonical layer list) from the plane's statistics.
    selective: tuple[tuple[str, str], ...] = ()

    @property
    def plane_names(self) -> tuple[str, ...]:
        return self.steering.settings.plane_names

    @property
    def hidden_size(self) -> int:
        return self.steering.info.hidden_size

    @property
    def plane(self) -> Plane:
        return self.steering.plane

    @property
    def plane_path(self) -> Path:
        return self.steering.plane_path

    def identity(self) -> dict[str, Any]:
        """Everything that determines the rows; its hash is the run id."""
        return run_identity(
            self.config,
            self.model,
            self.plane_sha256,
            self.prompt_sets,
            self.angles,
            self.plane_shas,
            self.windows,
        )


def run_identity(
    config: GridConfig,
    model: str,
    plane_sha256: str,
    prompt_sets: tuple[PromptSet, ...],
    angles: tuple[float, ...],
    plane_shas: tuple[tuple[str, str], ...] = (),
    windows: tuple[str, ...] = (ALL_LAYERS,),
) -> dict[str, Any]:
    # A single-plane, every-layer run keeps the identity (and run id) it had before sweeps.
    sweep: dict[str, Any] = {}
    if not all(is_default_setting(name, ALL_LAYERS) for name, _ in plane_shas):
        sweep["planes"] = [list(p) for p in plane_shas]
    if not all(is_default_setting(DEFAULT_PLANE, w) for w in windows):
        sweep["windows"] = list(windows)
    return {
        **sweep,
        "model": model,
        "revision": config.revision,
        "plane_sha256": plane_sha256,
        "prompts": [
            {"label": s.label, "sha256": s.sha256, "n": len(s.prompts)} for s in prompt_sets
        ],
        "column": config.column,
        "angles": list(angles),
        "baseline": config.baseline,
        "mode": config.mask,  # the key's old name: renaming it would change every run id
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "seed": config.seed,
        "samples_per_prompt": config.samples_per_prompt,
        "coherence": config.coherence,
        "dtype": config.dtype,
        # compiled and eager kernels may round differently: a resume must not mix them
        "enforce_eager": config.enforce_eager,
        "shard_size": config.shard_size,
    }


def identity_hash(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# --- validation ------------------------------------------------------------------------------


def resolve(config: GridConfig) -> ResolvedGrid:
    """Check every input and return the resolved request; GridConfigError on the first problem.

    Touches only files (and, for a hub id, the HF config download): no Ray, no vLLM.
    """
    _check_numbers(config)
    angles = normalize_angles(config.angles) if config.angles else ()
    if not angles and not config.baseline:
        raise GridConfigError("nothing to generate: no angles and --no-baseline")
    try:
        model, is_local = resolve_model(config.model)
    except ModelPathError as e:
        raise GridConfigError(str(e)) from None
    steering = _prepare_steering(model, config, is_local)
    if is_local:
        _check_weights_dir(Path(model))
    prompt_sets = _load_prompt_sets(config.prompts, config.column)
    plane_sha = file_sha256(steering.plane_path)
    plane_shas = tuple(
        (name, plane_sha if i == 0 else file_sha256(path))
        for i, (name, path) in enumerate(steering.settings.planes)
    )
    windows = _windows(config.windows, steering.info.num_layers)
    selective = _selective(steering) if SELECTIVE in windows else ()
    identity = run_identity(config, model, plane_sha, prompt_sets, angles, plane_shas, windows)
    run_id = identity_hash(identity)
    out = (
        Path(config.out).expanduser().resolve()
        if config.out
        else Path("runs").resolve() / f"grid-{run_id}"
    )
    return ResolvedGrid(
        config=config,
        model=model,
        model_is_local=is_local,
        steering=steering,
        plane_sha256=plane_sha,
        prompt_sets=prompt_sets,
        angles=angles,
        run_id=run_id,
        out=out,
        plane_shas=plane_shas,
        windows=windows,
        selective=selective,
    )


SELECTIVE = "selective"  # the window of each plane's own selective layers


def _selective(steering: SteeringSetup) -> tuple[tuple[str, str], ...]:
    out = []
    for name, plane in zip(steering.settings.plane_names, steering.planes, strict=True):
        try:
            layers = selective_layers(plane, f"plane {name!r}")
        except PlaneError as e:
            raise GridConfigError(f"--layers selective: {e}") from None
        out.append((name, ",".join(map(str, layers)) or "none"))
    return tuple(out)


def _windows(windows: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    """Canonical layer windows, each checked against the model's layer count; no duplicates."""
    if not windows:
        return ("all",)
    out: list[str] = []
    for raw in windows:
        try:
            spec = (
                SELECTIVE if raw.strip().lower() == SELECTIVE else canonical_window(raw, "--layers")
            )
            if spec != SELECTIVE:
                window_layers(spec, num_layers)
        except RequestSteeringError as e:
            raise GridConfigError(f"--layers {raw}: {e}") from None
        if spec in out:
            raise GridConfigError(f"--layers {raw} is given twice (as {spec})")
        out.append(spec)
    return tuple(out)


def _check_numbers(c: GridConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise GridConfigError(msg)

    need(c.mask in MASKS, f"--mask must be one of {', '.join(MASKS)}, got {c.mask!r}")
    need(c.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}")
    need(c.max_tokens >= 1, f"--max-tokens must be at least 1, got {c.max_tokens}")
    need(
        math.isfinite(c.temperature) and c.temperature >= 0,
        f"--temperature must be a number >= 0 (0 = greedy), got {c.temperature}",
    )
    need(
        c.samples_per_prompt >= 1,
        f"--samples-per-prompt must be at least 1, got {c.samples_per_prompt}",
    )
    need(c.shard_size >= 1, f"--shard-size must be at least 1, got {c.shard_size}")
    need(0 <= c.seed < 2**63, f"--seed must be in [0, 2^63), got {c.seed}")
    try:
        c.execution.check()
    except ExecutionConfigError as e:
        raise GridConfigError(str(e)) from None


def _prepare_steering(model: str, config: GridConfig, is_local: bool) -> SteeringSetup:
    """The engines' own set-up path (rotserve.steering), with errors naming the grid's flags."""
    try:
        info = ModelInfo.from_pretrained(model, config.revision)
    except RotServeConfigError as e:
        raise GridConfigError(f"--model: {e}") from None
    if config.planes:
        if config.plane is not None:
            raise GridConfigError("give --plane FILE or --plane NAME=FILE (repeatable), not both")
        planes = {}
        for name, raw in config.planes:
            if name in planes:
                raise GridConfigError(f"--plane {name}=...: the name {name!r} is given twice")
            planes[name] = _resolve_plane_path(raw, model, is_local)
        where = ", ".join(f"{n}={p}" for n, p in planes.items())
        plane_path = None
    else:
        planes = None
        plane_path = _resolve_plane_path(config.plane, model, is_local)
        where = str(plane_path)
    try:
        return prepare_steering(model, plane_path, planes=planes, info=info)
    except UnsupportedArchitectureError as e:
        raise GridConfigError(f"--model {model}: {e}") from None
    except (PlaneError, RotServeConfigError) as e:
        raise GridConfigError(f"--plane {where}: {e}") from None


def _check_weights_dir(model_dir: Path) -> None:
    """Refuse a model directory vLLM would mis-load, before an engine spends a minute failing.

    vLLM 0.32 loads EVERY top-level *.safetensors of a local model directory unless a
    model.safetensors.index.json lists the weight files; a plane file kept beside the weights
    (b1, b2 tensors) then fails the load with "no module or parameter named 'b1'".
    """
    if (model_dir / "model.safetensors.index.json").is_file():
        return
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = set(h.keys())
        except Exception:
            continue
        if keys and keys <= {"b1", "b2"}:
            raise GridConfigError(
                f"--model {model_dir}: {f.name} is a plane file inside the model directory, and "
                "vLLM would load it as model weights (it reads every *.safetensors when there is "
                "no model.safetensors.index.json). Add the index file (weight_map of the real "
                "weights) or keep the plane outside the model directory"
            )


def _resolve_plane_path(plane: str | None, model: str, is_local: bool) -> Path:
    if plane is None:
        shipped = Path(model) / PLANE_FILENAME if is_local else None
        if shipped is None or not shipped.is_file():
            raise GridConfigError(
                f"no --plane given and {model} ships no {PLANE_FILENAME}; extract one with "
                "`rotserve extract --model ...` and pass --plane FILE"
            )
        return shipped.resolve()
    path = Path(plane).expanduser()
    if not path.is_file():
        raise GridConfigError(f"--plane {plane}: file not found")
    return path.resolve()


def _load_prompt_sets(
    prompts: tuple[tuple[str, str], ...], column: str | None
) -> tuple[PromptSet, ...]:
    if not prompts:
        raise GridConfigError("no prompt sets: give at least one --prompts label=FILE")
    labels = [label for label, _ in prompts]
    dupes = sorted({lb for lb in labels if labels.count(lb) > 1})
    if dupes:
        raise GridConfigError(
            f"--prompts label(s) used twice: {', '.join(dupes)}; labels name datasets"
        )
    sets = []
    for label, raw in prompts:
        path = Path(raw).expanduser().resolve()
        try:
            loaded = load_prompts(path, column)
        except PromptFileError as e:
            raise GridConfigError(f"--prompts {label}={raw}: {e}") from None
        ids = [p.id for p in loaded]
        dup_ids = sorted({i for i in ids if ids.count(i) > 1})
        if dup_ids:
            raise GridConfigError(
                f"--prompts {label}={raw}: prompt id(s) used twice: {', '.join(dup_ids[:5])}; "
                "rows are keyed by (dataset, prompt_id, angle, mask, plane, window, sample)"
            )
        sets.append(
            PromptSet(label=label, path=path, sha256=file_sha256(path), prompts=tuple(loaded))
        )
    return tuple(sets)


def config_dict(config: GridConfig) -> dict[str, Any]:
    """JSON-ready form of the request (for the manifest)."""
    d = asdict(config)
    d["prompts"] = [list(p) for p in config.prompts]
    d["angles"] = list(config.angles)
    d["planes"] = [list(p) for p in config.planes]
    d["windows"] = list(config.windows)
    return d
