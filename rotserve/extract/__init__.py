"""Extract the steering plane from activation statistics: no text is generated.

    result = extract_plane(model="data/toy-refusal", out="plane.safetensors")
    print(result.summary())

Passes over the prompts (forward passes of the base model only, batched, left padded):

1. calibration split -> running class sums -> calibration candidates;
2. held-out split    -> each prompt's cosine with its site's calibration candidate (scalars:
                        the separability evidence) and the held-out class sums;
   calibration + held-out sums -> the candidates the plane is built from (all prompts);
3. only for --second per-sample: every prompt again, streamed into an IncrementalPCA.

So memory is O(sites x hidden) plus O(held-out prompts x sites) scalars, never O(prompts x
hidden). The plane file carries the method, the evidence table and the data hashes; beside it
go <stem>.candidates.json/.csv (every candidate's statistics) and <stem>.candidates.png.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rotserve.extract.activations import POSITIONS, ActivationReader
from rotserve.extract.candidates import (
    HARMFUL,
    HARMLESS,
    LABELS,
    SECOND_METHODS,
    SELECT_METHODS,
    Candidates,
    CandidateStat,
    ClassSums,
    ExtractionError,
    HeldOutScores,
    PerSamplePCA,
    SecondAxis,
    Site,
    candidate_table,
    last_pcs_plane,
    random_unit,
    second_pca,
    second_random,
    select_first_axis,
    window_indices,
)
from rotserve.hf.sites import parse_layers
from rotserve.plane import Plane, PlaneMeta, file_sha256
from rotserve.prompts import DATA_DIR, DEFAULT_PROMPTS, Prompt, load_prompts, prompts_sha256

DEFAULT_MODEL = DATA_DIR / "toy-refusal"
REPO_ROOT = DATA_DIR.parent
WEIGHTS_HASH_MAX_BYTES = 1 << 30

__all__ = [
    "DEFAULT_MODEL",
    "ExtractConfig",
    "ExtractionError",
    "ExtractionResult",
    "extract_from_loaded",
    "extract_plane",
]


@dataclass
class ExtractConfig:
    """Every choice of an extraction; the CLI flags map one to one onto these fields."""

    model: str = str(DEFAULT_MODEL)
    harmful: str = str(DEFAULT_PROMPTS[HARMFUL])
    harmless: str = str(DEFAULT_PROMPTS[HARMLESS])
    column: str | None = None
    limit: int | None = None  # first N prompts of each file
    out: str | None = "plane.safetensors"
    select: str = "max_sim"
    second: str = "pca"
    random_b1: bool = False
    layers: str | None = None  # "a:b" window restricting the candidates
    positions: str = "last"
    holdout: float = 0.25  # fraction of each class held out for the separability statistics
    seed: int = 0
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    chat_template: str | None = None  # path of a Jinja file
    trust_remote_code: bool = False
    figure: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.select not in SELECT_METHODS:
            raise ExtractionError(f"--select must be one of {', '.join(SELECT_METHODS)}")
        if self.second not in SECOND_METHODS:
            raise ExtractionError(f"--second must be one of {', '.join(SECOND_METHODS)}")
        if self.positions not in POSITIONS:
            raise ExtractionError(f"--positions must be one of {', '.join(POSITIONS)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ExtractionError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.select == "separability" and self.holdout <= 0:
            raise ExtractionError("--select separability needs held-out prompts: set --holdout > 0")
        if self.batch_size < 1:
            raise ExtractionError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.random_b1 and self.second != "random":
            raise ExtractionError(
                "--random-b1 is the full control: b2 is random too; drop --second or pass "
                "--second random"
            )


@dataclass
class ExtractionResult:
    plane: Plane
    table: list[CandidateStat]
    sites: list[Site]
    candidates: Candidates  # from all prompts
    config: ExtractConfig
    chosen: int | None  # index into sites/table of b1's site; None for mean / random
    paths: dict[str, Path] = field(default_factory=dict)
    reason: str = ""
    second_info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.plane.meta
        d = m.data
        n_layers = len(self.sites) // 2
        lines = [
            f"rotserve extract: {m.model} ({n_layers} layers, hidden {m.hidden_size}), "
            f"{d[HARMFUL]['count']} harmful + {d[HARMLESS]['count']} harmless prompts, "
            f"positions={self.config.positions}"
        ]
        if self.config.random_b1:
            lines.append(f"  b1: random (seed {self.config.seed}), the control")
        elif self.chosen is None:
            lines.append(f"  b1: {self.config.select}: {self.reason}")
        else:
            row = self.table[self.chosen]
            lines.append(
                f"  b1: {row.site} (layer {row.layer} of {n_layers}, depth "
                f"{row.depth / n_layers:.0%}) by {self.config.select}: {self.reason}"
            )
            lines.append(
                f"      ||r|| {row.norm:.3f}, mean cosine {row.mean_cosine:.3f}, held-out AUROC "
                f"{_fmt(row.auroc, '.3f')}, Cohen's d {_fmt(row.cohens_d, '.2f')}"
            )
        info = ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in self.second_info.items())
        lines.append(f"  b2: {self.config.second}" + (f" ({info})" if info else ""))
        off = [
            f"{r.site} {r.plane_angle:.0f}°"
            for r in self.table
            if r.plane_angle is not None and min(r.plane_angle, 360 - r.plane_angle) > 30
        ]
        if off and not self.config.random_b1:
            lines.append(f"  candidates more than 30° from b1 in the plane: {', '.join(off)}")
        if self.config.layers:
            lines.append(f"  window: layers {self.config.layers}")
        for key in ("plane", "json", "csv", "png"):
            if key in self.paths:
                extra = f" (plane id {self.plane.plane_id})" if key == "plane" else ""
                lines.append(f"  {key:<6} {self.paths[key]}{extra}")
        return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def extract_plane(config: ExtractConfig | None = None, **overrides: Any) -> ExtractionResult:
    """Load the model and prompt files named in config, extract, write the files."""
    from rotserve.hf.generate import load_hf_model

    cfg = config or ExtractConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown extraction option {k!r}")
        setattr(cfg, k, str(v) if isinstance(v, Path) else v)
    cfg.validate()
    prompts = {
        HARMFUL: load_prompts(cfg.harmful, cfg.column, cfg.limit),
        HARMLESS: load_prompts(cfg.harmless, cfg.column, cfg.limit),
    }
    _check_counts(prompts, {HARMFUL: cfg.harmful, HARMLESS: cfg.harmless})
    template = None
    if cfg.chat_template:
        path = Path(cfg.chat_template)
        if not path.is_file():
            raise ExtractionError(f"--chat-template: file not found: {path}")
        template = path.read_text(encoding="utf-8")
    model, tokenizer = load_hf_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    data = {
        label: {
            "path": display_path(getattr(cfg, label)),
            "file_sha256": file_sha256(getattr(cfg, label)),
            "prompts_sha256": prompts_sha256(prompts[label]),
        }
        for label in LABELS
    }
    weights = Path(cfg.model) / "model.safetensors"
    if weights.is_file() and weights.stat().st_size <= WEIGHTS_HASH_MAX_BYTES:
        # A single small local checkpoint (the toy): its hash shows whether a shipped plane
        # still belongs to the weights beside it. Big or sharded models are named, not hashed.
        data["model"] = {"path": display_path(cfg.model), "weights_sha256": file_sha256(weights)}
    return extract_from_loaded(model, tokenizer, prompts, cfg, template, data)


def _check_counts(prompts: dict[str, Sequence[Prompt]], sources: dict[str, Any]) -> None:
    for label in LABELS:
        n = len(prompts[label])
        if n < 2:
            raise ExtractionError(
                f"{sources[label]}: {n} {label} instruction(s); each class needs at least 2 "
                f"(a class mean from one prompt is that prompt, not a direction)"
            )


def split_prompts(
    prompts: Sequence[Prompt], holdout: float, seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """(calibration, held-out), a seeded random split keeping at least one prompt on each side."""
    if holdout <= 0:
        return list(prompts), []
    n = len(prompts)
    n_hold = min(max(int(round(holdout * n)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    held = set(perm[:n_hold].tolist())
    return (
        [p for i, p in enumerate(prompts) if i not in held],
        [p for i, p in enumerate(prompts) if i in held],
    )


def extract_from_loaded(
    model: Any,
    tokenizer: Any,
    prompts: dict[str, Sequence[Prompt]] | dict[str, Sequence[str]],
    config: ExtractConfig | None = None,
    chat_template: str | None = None,
    data: dict[str, Any] | None = None,
) -> ExtractionResult:
    """Extract from an already loaded model; prompts maps harmful/harmless to instructions.

    config.out None writes nothing (the result still holds the plane and the table).
    """
    cfg = config or ExtractConfig()
    cfg.validate()
    plist = {
        label: [_as_prompt(p, label, i) for i, p in enumerate(prompts[label])] for label in LABELS
    }
    _check_counts(plist, {label: label for label in LABELS})
    reader = ActivationReader(
        model, tokenizer, cfg.positions, cfg.batch_size, chat_template, cfg.progress
    )
    reader.chat_texts([plist[HARMFUL][0].instruction])  # no template: fail before any forward
    sites, hidden = reader.sites, reader.hidden
    n_layers = len(reader.layers)
    try:
        window = window_indices(sites, parse_layers(cfg.layers, n_layers))
    except ValueError as e:
        raise ExtractionError(f"--layers: {e}") from None

    splits = {label: split_prompts(plist[label], cfg.holdout, cfg.seed) for label in LABELS}

    def texts(label: str, part: int) -> list[str]:
        return [p.instruction for p in splits[label][part]]

    # Pass 1: calibration sums.
    cal = ClassSums(len(sites), hidden)
    for label in LABELS:
        for acts in reader.batches(texts(label, 0), f"{label} calibration"):
            cal.update(acts, label)

    # Pass 2: held-out projections on the calibration candidates, plus the held-out sums.
    aurocs = ds = None
    total = cal
    if cfg.holdout > 0:
        held_sums = ClassSums(len(sites), hidden)
        scores = HeldOutScores(cal.candidates().d)
        for label in LABELS:
            for acts in reader.batches(texts(label, 1), f"{label} held-out"):
                scores.update(acts, label)
                held_sums.update(acts, label)
        aurocs, ds = scores.stats()
        total = cal.merged(held_sums)
    cands = total.candidates()
    table = candidate_table(sites, cands, window, aurocs, ds)

    # First axis.
    if cfg.random_b1:
        b1, chosen, reason = random_unit(hidden, cfg.seed), None, "random (control)"
    else:
        first = select_first_axis(cfg.select, table, cands, window)
        b1, chosen, reason = first.b1, first.index, first.reason

    # Second axis.
    first_b1 = b1
    second: SecondAxis
    if cfg.second == "random":
        second = second_random(b1, cfg.seed)
    elif cfg.second == "pca":
        second = second_pca(cands.d, window, b1)
    elif cfg.second == "last-pcs":
        second = last_pcs_plane(cands.d, window, b1)
    else:  # per-sample: pass 3 over every prompt, streamed into IncrementalPCA
        ps = PerSamplePCA(b1, cands.means, window, chunk_rows=max(256, 4 * len(window)))
        for label in LABELS:
            for acts in reader.batches(
                [p.instruction for p in plist[label]], f"{label} per-sample"
            ):
                ps.update(acts, label)
        second = ps.finish()

    b1, b2 = second.b1, second.b2
    if cfg.second == "last-pcs":
        # The plane replaced b1: the --select choice only orients it (see last_pcs_plane).
        reason += (
            f"; b1 = its projection onto the last-two-PC plane (cos {float(b1 @ first_b1):.3f})"
        )
    for i, row in enumerate(table):
        row.cos_b1 = float(cands.d[i] @ b1)
        row.cos_b2 = float(cands.d[i] @ b2)
        # Where the candidate points inside the plane: a refusal peak away from 0 degrees in
        # a sweep often sits at the angle of some candidate (e.g. an early-layer outlier).
        row.plane_angle = round(math.degrees(math.atan2(row.cos_b2, row.cos_b1)), 3) % 360.0
        row.chosen = i == chosen and cfg.second != "last-pcs"

    # from_pretrained records the id or path it was given; a model built in memory has none.
    model_name = display_path(getattr(model.config, "_name_or_path", "") or str(cfg.model))
    site = sites[chosen] if chosen is not None else None
    method = {
        "select": None if cfg.random_b1 else cfg.select,
        "second": cfg.second,
        "random_b1": cfg.random_b1,
        "site": site.kind if site else None,
        "site_name": site.name if site else None,
        "layer": site.layer if site else None,
        "num_layers": n_layers,
        "positions": cfg.positions,
        "layers": cfg.layers,
        "window": [sites[i].name for i in window],
        "holdout": cfg.holdout,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "reason": reason,
        "second_info": second.info,
        "chat_template": cfg.chat_template,
    }
    data = dict(data or {})
    for label in LABELS:
        entry = dict(data.get(label, {}))
        entry.setdefault("prompts_sha256", prompts_sha256(plist[label]))
        entry.update(
            count=len(plist[label]),
            calibration=len(splits[label][0]),
            heldout=len(splits[label][1]),
        )
        data[label] = entry
    meta = PlaneMeta(
        model=model_name,
        hidden_size=hidden,
        method=method,
        candidates=[row.as_dict() for row in table],
        data=data,
    )
    plane = Plane(b1, b2, meta)
    result = ExtractionResult(
        plane, table, sites, cands, cfg, chosen, reason=reason, second_info=second.info
    )
    if cfg.out:
        result.paths = write_outputs(result, Path(cfg.out), figure=cfg.figure)
    return result


def display_path(path: str | Path) -> str:
    """A path inside the rotserve checkout as repo-relative (data/toy-refusal), else as given.

    So the shipped plane names its model and prompt files the same way on every machine.
    """
    text = str(path)
    try:
        return Path(text).resolve().relative_to(REPO_ROOT).as_posix()
    except (ValueError, OSError):
        return text


def _as_prompt(p: Prompt | str, label: str, i: int) -> Prompt:
    return p if isinstance(p, Prompt) else Prompt(id=f"{label}-{i + 1}", instruction=str(p))


def side_paths(out: Path) -> dict[str, Path]:
    """plane.safetensors -> plane.candidates.json / .csv / .png beside it."""
    stem = out.name.removesuffix(".safetensors")
    return {
        "plane": out,
        "json": out.with_name(f"{stem}.candidates.json"),
        "csv": out.with_name(f"{stem}.candidates.csv"),
        "png": out.with_name(f"{stem}.candidates.png"),
    }


def write_outputs(result: ExtractionResult, out: Path, figure: bool = True) -> dict[str, Path]:
    paths = side_paths(out)
    result.plane.save(paths["plane"])
    meta = result.plane.meta
    rows = [row.as_dict() for row in result.table]
    doc = {
        "model": meta.model,
        "hidden_size": meta.hidden_size,
        "plane": {"path": str(paths["plane"]), "plane_id": result.plane.plane_id},
        "method": meta.method,
        "data": meta.data,
        "candidates": rows,
    }
    paths["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if figure:
        from rotserve.extract.figure import candidates_figure

        coords = torch.stack(
            [result.candidates.d @ result.plane.b1, result.candidates.d @ result.plane.b2], 1
        )
        candidates_figure(result.table, coords.numpy(), paths["png"], title=_figure_title(result))
    else:
        del paths["png"]
    return paths


def _figure_title(result: ExtractionResult) -> str:
    m = result.plane.meta.method
    b1 = (
        "random b1"
        if m["random_b1"]
        else f"b1 {m['select']}" + (f" @ {m['site_name']}" if m["site_name"] else "")
    )
    return (
        f"{Path(result.plane.meta.model).name or result.plane.meta.model}: {b1}, b2 {m['second']}"
    )
