"""The report's capability side: a circle per lm-eval task of `rotserve capability` (score by
angle, the baseline dashed), and per (plane, window, mask) the refusal range, the clean steering
range (coherence and every task within a margin of the baseline) and their overlap.

The range math (angles + values + baseline + margin -> arcs) is pure and kept apart from the
reading and drawing below it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from rotserve.report.summary import BASELINE, REFUSING, SummaryRow, datasets, mask_of, setting_of

# Defaults a researcher can defend without looking at the data:
# - coherence: the mean NLL per token (nats) of the generations under the unsteered model may
#   rise by 0.5 (perplexity x1.65). Sampling noise of a cell's mean is ~0.1 nats at a hundred
#   generations; broken text (gibberish, loops of odd tokens) rises by several nats.
# - capability: a task's primary metric may drop by 0.05 on its own scale (5 points of
#   accuracy), about one standard error of a 100-item benchmark (tinyBenchmarks), so smaller
#   drops are not told apart from noise.
DEFAULT_NLL_MARGIN = 0.5
DEFAULT_SCORE_MARGIN = 0.05


class Arc(NamedTuple):
    """Sampled angles start..end (degrees) by increasing angle, through 360° = 0° when end <
    start; full: every
    sampled angle (then start and end are the first and last)."""

    start: float
    end: float
    full: bool = False


# ----------------------------------------------------------------------------- pure range math


def arcs_of(angles: Sequence[float], keep: Sequence[bool]) -> list[Arc]:
    """The runs of kept angles, neighbours in sorted order, a run through 360° = 0° joined into
    one arc. Every angle kept: one full arc; none: []."""
    if len(angles) != len(keep):
        raise ValueError(f"arcs_of: {len(angles)} angles but {len(keep)} flags")
    pts = sorted(zip(angles, keep, strict=True))
    if not pts:
        return []
    flags = [k for _, k in pts]
    if all(flags):
        return [Arc(pts[0][0], pts[-1][0], full=True)]
    # scan from just after a dropped angle, so an arc through 0° stays whole
    start = flags.index(False) + 1
    arcs: list[Arc] = []
    run: list[float] = []
    for i in range(len(pts)):
        a, k = pts[(start + i) % len(pts)]
        if k:
            run.append(a)
        elif run:
            arcs.append(Arc(run[0], run[-1]))
            run = []
    if run:
        arcs.append(Arc(run[0], run[-1]))
    return sorted(arcs, key=lambda arc: arc.start)


def within_margin(
    values: Sequence[float | None],
    baseline: float,
    margin: float,
    higher_is_better: bool = True,
) -> list[bool]:
    """Per value: no worse than the baseline by more than margin (better is always within).
    A missing value (None, NaN) is not within: an unmeasured angle is never called clean."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    out = []
    for v in values:
        if v is None or math.isnan(v):
            out.append(False)
        elif higher_is_better:
            out.append(v >= baseline - margin)
        else:
            out.append(v <= baseline + margin)
    return out


def margin_range(
    angles: Sequence[float],
    values: Sequence[float | None],
    baseline: float,
    margin: float,
    higher_is_better: bool = True,
) -> list[Arc]:
    """The arcs where a value stays within margin of its baseline (see within_margin)."""
    return arcs_of(angles, within_margin(values, baseline, margin, higher_is_better))


def below_range(
    angles: Sequence[float], values: Sequence[float | None], threshold: float
) -> list[Arc]:
    """The arcs where a value is below threshold (a missing value is not)."""
    return arcs_of(angles, [v is not None and v < threshold for v in values])


def format_arcs(arcs: Sequence[Arc]) -> str:
    """ "40°–175°, 300°–20°"; "all angles" for a full circle; "none" for no arc."""
    if not arcs:
        return "none"
    if arcs[0].full:
        return f"all angles ({arcs[0].start:g}°–{arcs[0].end:g}°)"
    return ", ".join(f"{a:g}°" if a == b else f"{a:g}°–{b:g}°" for a, b, _ in arcs)


# ----------------------------------------------------------------------------- the report side


@dataclass(frozen=True)
class CleanMargins:
    """What `rotserve report` calls clean, and whose refusal it ranges."""

    nll_margin: float = DEFAULT_NLL_MARGIN
    score_margin: float = DEFAULT_SCORE_MARGIN
    refusal_dataset: str | None = None  # None: `harmful` if the run has it, else its first
    refusal_threshold: float = REFUSING


@dataclass(frozen=True)
class TaskScores:
    """One task's primary metric at every setting of one capability table."""

    table: str
    task: str
    metric: str
    filter: str
    higher_is_better: bool
    is_group: bool
    baseline: float | None
    # (setting, mask, angle) -> value
    values: dict[tuple[str, str, float], float | None]

    @property
    def label(self) -> str:
        f = "" if self.filter == "none" else f", {self.filter}"
        return f"{self.task} ({self.metric}{f})"


@dataclass(frozen=True)
class SettingRanges:
    setting: str  # "PLANE [WINDOW]", or "" for a run's one plane at every layer
    mask: str
    angles: tuple[float, ...]
    refusal: list[Arc]
    clean: list[Arc] | None  # None: nothing to judge cleanness by (no NLL, no capability)
    overlap: list[Arc] | None


@dataclass
class CapabilityReport:
    margins: CleanMargins
    refusal_dataset: str
    criteria: list[str]  # what the clean range checks, in words
    ranges: list[SettingRanges]
    tasks: list[TaskScores] = field(default_factory=list)
    circles: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        m = self.margins
        lines = [
            "## Refusal range, clean range and their overlap",
            "",
            f"Refusal range: angles where `{self.refusal_dataset}`'s refusal rate is below "
            f"{m.refusal_threshold:.0%}. Clean range: angles where "
            + (" and ".join(self.criteria) if self.criteria else "(nothing to judge by)")
            + ". Overlap: the angles that steer refusal away without breaking the model. "
            'An arc "a–b" runs from a up to b by increasing angle, through 360° = 0° when b < a.',
            "",
            "| setting | mask | refusal range | clean range | overlap |",
            "|---|---|---|---|---|",
        ]
        for r in self.ranges:
            lines.append(
                f"| {r.setting or 'default'} | {r.mask} | {format_arcs(r.refusal)} | "
                f"{_fmt(r.clean)} | {_fmt(r.overlap)} |"
            )
        return "\n".join(lines) + "\n"

    def short_text(self) -> str:
        lines = [
            f"ranges (refusal: {self.refusal_dataset} < {self.margins.refusal_threshold:.0%}; "
            f"clean: {' and '.join(self.criteria) or 'nothing to judge by'}):"
        ]
        for r in self.ranges:
            name = f"{r.setting}, {r.mask}" if r.setting else r.mask
            lines.append(
                f"  {name}: refusal {format_arcs(r.refusal)}; clean {_fmt(r.clean)}; "
                f"overlap {_fmt(r.overlap)}"
            )
        for t in self.tasks:
            if t.baseline is not None:
                lines.append(f"  capability {t.label}: baseline {t.baseline:.3f}")
        return "\n".join(lines + self.warnings)


def _fmt(arcs: list[Arc] | None) -> str:
    return "n/a" if arcs is None else format_arcs(arcs)


def setting_ranges(
    rows: Sequence[SummaryRow],
    tasks: Sequence[TaskScores],
    margins: CleanMargins,
    refusal_dataset: str,
) -> list[SettingRanges]:
    """Per (setting, mask) of the summary: the three ranges over the angles the grid sampled."""
    base = {r.dataset: r for r in rows if r.mask == BASELINE}
    # coherence is judged per dataset, against that dataset's own baseline NLL
    nll_datasets = [d for d in datasets(rows) if d in base and base[d].mean_nll is not None]
    judged = [t for t in tasks if not t.is_group and t.baseline is not None]
    out = []
    keys = list(dict.fromkeys((r.setting, r.mask) for r in rows if r.mask != BASELINE))
    for setting, mask in keys:
        cell = {(r.dataset, r.angle): r for r in rows if (r.setting, r.mask) == (setting, mask)}
        angles = sorted({a for _, a in cell if a is not None})
        rates = [_get(cell, refusal_dataset, a, "refusal_rate") for a in angles]
        refusal = below_range(angles, rates, margins.refusal_threshold)
        keeps: list[list[bool]] = []
        for d in nll_datasets:
            nlls = [_get(cell, d, a, "mean_nll") for a in angles]
            keeps.append(
                within_margin(nlls, base[d].mean_nll, margins.nll_margin, higher_is_better=False)
            )
        for t in judged:
            vals = [t.values.get((setting, mask, a)) for a in angles]
            keeps.append(within_margin(vals, t.baseline, margins.score_margin, t.higher_is_better))
        clean = overlap = None
        if keeps:
            clean_flags = [all(k) for k in zip(*keeps, strict=True)]
            clean = arcs_of(angles, clean_flags)
            refused_away = [v is not None and v < margins.refusal_threshold for v in rates]
            overlap = arcs_of(
                angles, [c and r for c, r in zip(clean_flags, refused_away, strict=True)]
            )
        out.append(SettingRanges(setting, mask, tuple(angles), refusal, clean, overlap))
    return out


def _get(cell: dict, dataset: str, angle: float, attr: str) -> float | None:
    r = cell.get((dataset, angle))
    return None if r is None else getattr(r, attr)


def primary_metric(scores: list[dict[str, Any]], config: dict[str, Any] | None) -> tuple[str, str]:
    """(metric, filter) a task is judged by: its config's first metric and first filter, as
    lm-eval lists them; without a config, `none` filter first, then the metric name."""
    present = {(s["metric"], s["filter"]) for s in scores}
    config = config or {}
    metrics = [m.get("metric") for m in config.get("metric_list") or [] if isinstance(m, dict)]
    filters = [f.get("name") for f in config.get("filter_list") or [] if isinstance(f, dict)]
    for m in metrics:
        for f in [*filters, "none"]:
            if (m, f) in present:
                return m, f
    return min(present, key=lambda mf: (mf[1] != "none", mf[1], mf[0]))


def read_task_scores(run_dir: Path) -> tuple[list[TaskScores], list[str]]:
    """Every complete capability table's tasks, primary metric only; warnings for the others."""
    from rotserve.capability.table import (
        capability_tables,
        read_capability_manifest,
        read_scores,
    )
    from rotserve.rundir import RunDirError

    tasks: list[TaskScores] = []
    warnings: list[str] = []
    for name in capability_tables(run_dir):
        try:
            table = read_scores(run_dir, name)
        except (RunDirError, OSError) as e:
            warnings.append(f"capability table {name} left out: {e}")
            continue
        manifest = read_capability_manifest(run_dir, name) or {}
        configs = (manifest.get("tasks") or {}).get("configs") or {}
        by_task: dict[str, list[dict[str, Any]]] = {}
        for s in table.to_pylist():
            by_task.setdefault(s["task"], []).append(s)
        for task, scores in by_task.items():
            metric, filt = primary_metric(scores, configs.get(task))
            chosen = [s for s in scores if (s["metric"], s["filter"]) == (metric, filt)]
            hib = next((s["higher_is_better"] for s in chosen), None)
            baseline = next((s["value"] for s in chosen if s["angle"] is None), None)
            values = {
                (
                    setting_of(s["angle"], s["plane"], s["window"]),
                    mask_of(s["angle"], s["adaptive"]),
                    s["angle"],
                ): s["value"]
                for s in chosen
                if s["angle"] is not None
            }
            if baseline is None:
                warnings.append(
                    f"capability {task} ({name}): no baseline score (a --no-baseline table), "
                    "so it is drawn but not part of the clean range"
                )
            tasks.append(
                TaskScores(
                    name,
                    task,
                    metric,
                    filt,
                    hib is not False,
                    bool(chosen[0]["is_group"]),
                    baseline,
                    values,
                )  # fmt: skip
            )
    return tasks, warnings


def capability_report(
    run_dir: Path,
    rows: Sequence[SummaryRow],
    out: Path,
    title: str,
    margins: CleanMargins | None = None,
) -> CapabilityReport:
    """Read the run's capability tables, draw a circle per task into out, and range every
    (setting, mask) of the summary."""
    margins = margins or CleanMargins()
    ds = datasets(rows)
    refusal_dataset = margins.refusal_dataset or ("harmful" if "harmful" in ds else ds[0])
    if refusal_dataset not in ds:
        raise ValueError(
            f"--refusal-dataset {refusal_dataset!r} is not in the run (datasets: {', '.join(ds)})"
        )
    tasks, warnings = read_task_scores(run_dir)
    criteria = []
    if any(r.mask == BASELINE and r.mean_nll is not None for r in rows):
        criteria.append(f"each dataset's NLL rises by at most {margins.nll_margin:g} nats/token")
    judged = [t for t in tasks if not t.is_group and t.baseline is not None]
    if judged:
        criteria.append(
            f"each task's score ({', '.join(t.label for t in judged)}) drops by at most "
            f"{margins.score_margin:g}"
        )
    rep = CapabilityReport(
        margins=margins,
        refusal_dataset=refusal_dataset,
        criteria=criteria,
        ranges=setting_ranges(rows, tasks, margins, refusal_dataset),
        tasks=tasks,
        warnings=warnings,
    )
    names = [t.task for t in tasks]
    for t in tasks:
        stem = t.task if names.count(t.task) == 1 else f"{t.table}.{t.task}"
        path = out / f"capability_{_safe(stem)}_polar.png"
        rep.circles.append(capability_plot(t, path, title=f"{t.label} by angle — {title}"))
    return rep


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def capability_plot(task: TaskScores, path: Path, title: str = "") -> Path:
    """One polar panel: a line per (plane, window, mask), the unsteered score a dashed circle."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(subplot_kw={"projection": "polar"}, figsize=(6.0, 6.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = list(dict.fromkeys((s, m) for s, m, _ in task.values))
    for i, (setting, mask) in enumerate(lines):
        pts = sorted((a, v) for (s, m, a), v in task.values.items() if (s, m) == (setting, mask))
        pts = [(a, v) for a, v in pts if v is not None]
        if not pts:
            continue
        theta = [math.radians(a) for a, _ in pts]
        vals = [v for _, v in pts]
        if len(pts) >= 3:  # close the loop through 360° = 0°
            theta.append(theta[0] + 2 * math.pi)
            vals.append(vals[0])
        label = f"{setting}, {mask} mask" if setting else f"{mask} mask"
        ax.plot(theta, vals, "-o", color=colours[i % len(colours)], markersize=3,
                linewidth=1.5, label=label)  # fmt: skip
    if task.baseline is not None:
        circle = [2 * math.pi * i / 360 for i in range(361)]
        ax.plot(circle, [task.baseline] * len(circle), "--", color="black", linewidth=1.0,
                alpha=0.7, label=f"baseline ({task.baseline:.3f})")  # fmt: skip
    values = [v for v in task.values.values() if v is not None]
    if task.baseline is not None:
        values.append(task.baseline)
    if values and min(values) >= 0 and max(values) <= 1:
        ax.set_ylim(0, 1.05)
    ax.set_title(task.label, pad=14)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    fig.suptitle(title or f"{task.label} by steering angle", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * -(-len(labels) // 3), 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
