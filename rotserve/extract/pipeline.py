"""The extraction itself: the passes over the prompts, b1 and b2, the plane and its header.

Passes over the prompts (forward passes of the base model only, batched, left padded):

1. calibration split -> running class sums -> calibration candidates;
2. held-out split    -> each prompt's cosine with its site's calibration candidate (scalars:
                        the separability evidence) and the held-out class sums;
   calibration + held-out sums -> the candidates the plane is built from (all prompts);
3. only for --second per-sample: every prompt again, streamed into an IncrementalPCA.

So memory is O(sites x hidden) plus O(held-out prompts x sites) scalars, never O(prompts x
hidden). The statistics are in candidates.py, the b1 rules in first_axis.py, the b2 methods in
second_axis.py; this module only orders the passes and assembles what they give.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rotserve.dtype import choose_dtype
from rotserve.extract.activations import ActivationReader
from rotserve.extract.candidates import (
    HARMFUL,
    HARMLESS,
    LABELS,
    Candidates,
    CandidateStat,
    ClassSums,
    ExtractionError,
    HeldOutScores,
    Site,
    candidate_table,
    random_unit,
    window_indices,
)
from rotserve.extract.config import ExtractConfig
from rotserve.extract.first_axis import SELECT_RULES, select_first_axis
from rotserve.extract.inputs import (
    as_prompt,
    check_counts,
    load_prompt_files,
    provenance,
    read_chat_template,
)
from rotserve.extract.outputs import display_path, write_outputs
from rotserve.extract.result import ExtractionResult
from rotserve.extract.second_axis import SECOND_METHODS, SecondAxis, SecondAxisInputs
from rotserve.plane import Plane, PlaneMeta
from rotserve.prompts import Prompt, prompts_sha256
from rotserve.steering import WindowError, parse_window

Splits = dict[str, tuple[list[Prompt], list[Prompt]]]  # label -> (calibration, held-out)


def extract_plane(config: ExtractConfig | None = None, **overrides: Any) -> ExtractionResult:
    """Load the model and prompt files named in config, extract, write the files.

    overrides set config fields by name (extract_plane(model=..., out=...)); a Path becomes
    its string, as the CLI would pass it.
    """
    from rotserve.hf.generate import load_hf_model

    cfg = config or ExtractConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown extraction option {k!r}")
        setattr(cfg, k, str(v) if isinstance(v, Path) else v)
    cfg.validate()
    # Prompt files and template first: a typo fails in a second, not after loading a model.
    prompts = load_prompt_files(cfg)
    template = read_chat_template(cfg.chat_template)
    choice = choose_dtype(cfg.dtype, gpu=cfg.device.startswith("cuda"))
    if cfg.dtype == "auto":
        print(f"rotserve extract: {choice.describe()}", file=sys.stderr)
    cfg = replace(cfg, dtype=choice.dtype)  # what the files record: the dtype that ran
    model, tokenizer = load_hf_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    return extract_from_loaded(model, tokenizer, prompts, cfg, template, provenance(cfg, prompts))


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

    config.out None writes nothing (the result still holds the plane and the table). data is
    the provenance recorded in the plane's header (see inputs.provenance); prompt hashes and
    counts are filled in whatever it holds.
    """
    cfg = config or ExtractConfig()
    cfg.validate()
    plist = {
        label: [as_prompt(p, label, i) for i, p in enumerate(prompts[label])] for label in LABELS
    }
    check_counts(plist, {label: label for label in LABELS})
    reader = ActivationReader(
        model, tokenizer, cfg.positions, cfg.batch_size, chat_template, cfg.progress
    )
    reader.chat_texts([plist[HARMFUL][0].instruction])  # no template: fail before any forward
    sites = reader.sites
    n_layers = len(reader.layers)
    try:
        layers = None if cfg.layers is None else parse_window(cfg.layers, n_layers)
    except WindowError as e:
        raise ExtractionError(str(e)) from None
    window = window_indices(sites, layers)

    splits = {label: split_prompts(plist[label], cfg.holdout, cfg.seed) for label in LABELS}
    cands, aurocs, ds = _class_statistics(reader, splits, cfg.holdout)
    model_name = display_path(getattr(model.config, "_name_or_path", "") or str(cfg.model))

    def plane_for(c: ExtractConfig) -> ExtractionResult:
        """The plane one set of choices makes from the statistics (computed once)."""
        table = candidate_table(sites, cands, window, aurocs, ds)
        if c.random_b1:
            b1, chosen, reason = random_unit(reader.hidden, c.seed), None, "random (control)"
        else:
            first = select_first_axis(c.select, table, cands, window)
            b1, chosen, reason = first.b1, first.index, first.reason
        second = _second_axis(c, reader, plist, cands, window, b1)
        if second.b1_replaced:
            # The method replaced b1 (last-pcs): the --select choice only oriented it.
            reason += "; " + second.b1_replaced
        # Then no site's candidate is b1, so no row is marked chosen.
        _place_in_plane(table, cands, second, None if second.b1_replaced else chosen)
        # from_pretrained records the id or path it was given; a model built in memory has none.
        meta = PlaneMeta(
            model=model_name,
            hidden_size=reader.hidden,
            method=_method_record(c, sites, window, chosen, n_layers, reason, second),
            candidates=[row.as_dict() for row in table],
            data=_data_record(data, plist, splits),
        )
        plane = Plane(second.b1, second.b2, meta)
        return ExtractionResult(
            plane, table, sites, cands, c, chosen, reason=reason, second_info=second.info
        )

    result = plane_for(cfg)
    if cfg.out:
        result.paths = write_outputs(result, Path(cfg.out), figure=cfg.figure)
        if cfg.controls:
            for name, control in control_configs(cfg).items():
                path = control_path(Path(cfg.out), name)
                write_outputs(plane_for(control), path, figure=False)
                result.controls[name] = path
    return result


def control_configs(cfg: ExtractConfig) -> dict[str, ExtractConfig]:
    """The standard controls of a plane, by name: b2 random (b1 as chosen), b1 and b2 random,
    and b1 by every other selection rule (b2 as chosen). Same statistics, same seed."""
    from dataclasses import replace

    out = {}
    if cfg.second != "random":
        out["random-b2"] = replace(cfg, second="random", controls=False)
    if not cfg.random_b1:
        out["random"] = replace(cfg, random_b1=True, second="random", controls=False)
    for name, rule in SELECT_RULES.items():
        if name != cfg.select and not cfg.random_b1 and (not rule.needs_holdout or cfg.holdout > 0):
            out[f"select-{name}".replace("_", "-")] = replace(cfg, select=name, controls=False)
    return out


def control_path(out: Path, name: str) -> Path:
    """`plane.safetensors` -> `plane.ctrl-<name>.safetensors`, beside the plane."""
    return out.with_name(f"{out.stem}.ctrl-{name}{out.suffix}")


def _class_statistics(
    reader: ActivationReader, splits: Splits, holdout: float
) -> tuple[Candidates, list[float] | None, list[float] | None]:
    """Passes 1 and 2: (candidates from all prompts, held-out AUROC and Cohen's d per site).

    The held-out statistics score the calibration candidates on prompts they were not
    computed from (None without a held-out split); the plane then uses every prompt.
    """
    n_sites, hidden = len(reader.sites), reader.hidden

    def texts(label: str, part: int) -> list[str]:
        return [p.instruction for p in splits[label][part]]

    # Pass 1: calibration sums.
    cal = ClassSums(n_sites, hidden)
    for label in LABELS:
        for acts in reader.batches(texts(label, 0), f"{label} calibration"):
            cal.update(acts, label)
    if holdout <= 0:
        return cal.candidates(), None, None

    # Pass 2: held-out projections on the calibration candidates, plus the held-out sums.
    held_sums = ClassSums(n_sites, hidden)
    scores = HeldOutScores(cal.candidates().d)
    for label in LABELS:
        for acts in reader.batches(texts(label, 1), f"{label} held-out"):
            scores.update(acts, label)
            held_sums.update(acts, label)
    aurocs, ds = scores.stats()
    return cal.merged(held_sums).candidates(), aurocs, ds


def _second_axis(
    cfg: ExtractConfig,
    reader: ActivationReader,
    plist: dict[str, list[Prompt]],
    cands: Candidates,
    window: Sequence[int],
    b1: torch.Tensor,
) -> SecondAxis:
    """b2 by cfg.second; per-sample runs pass 3 over every prompt."""

    def batches(name: str) -> Iterator[tuple[torch.Tensor, str]]:
        for label in LABELS:
            for acts in reader.batches([p.instruction for p in plist[label]], f"{label} {name}"):
                yield acts, label

    inputs = SecondAxisInputs(b1, cands, window, cfg.seed, batches)
    return SECOND_METHODS[cfg.second].build(inputs)


def _place_in_plane(
    table: Sequence[CandidateStat], cands: Candidates, second: SecondAxis, chosen: int | None
) -> None:
    """Fill each row's cosines with the final b1 and b2, its angle in the plane, `chosen`."""
    for i, row in enumerate(table):
        row.cos_b1 = float(cands.d[i] @ second.b1)
        row.cos_b2 = float(cands.d[i] @ second.b2)
        # Where the candidate points inside the plane: a refusal peak away from 0 degrees in
        # a sweep often sits at the angle of some candidate (e.g. an early-layer outlier).
        row.plane_angle = round(math.degrees(math.atan2(row.cos_b2, row.cos_b1)), 3) % 360.0
        row.harmful_b1 = float(cands.means[HARMFUL][i] @ second.b1)
        row.harmless_b1 = float(cands.means[HARMLESS][i] @ second.b1)
        row.chosen = i == chosen


def _method_record(
    cfg: ExtractConfig,
    sites: Sequence[Site],
    window: Sequence[int],
    chosen: int | None,
    n_layers: int,
    reason: str,
    second: SecondAxis,
) -> dict[str, Any]:
    """The plane header's `method`: every choice, and which site b1 came from."""
    site = sites[chosen] if chosen is not None else None
    return {
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


def _data_record(
    data: dict[str, Any] | None, plist: dict[str, list[Prompt]], splits: Splits
) -> dict[str, Any]:
    """The plane header's `data`: the caller's provenance plus counts and prompt hashes."""
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
    return data
