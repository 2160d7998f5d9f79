"""The judges' side of the report: per dataset × mask × angle, each label's share and the mean
probability the judge gave it, for every verdict table of the run; a polar plot per table (one line per label) and example generations
per label and angle region.

Reads the run directory only (rotserve.rundir: rows, verdict tables, their checks). Uses
pyarrow and the standard library (pandas is a dev extra, not a dependency).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from rotserve.report.summary import BASELINE, MASK_ORDER, mask_of, setting_of
from rotserve.rundir import (
    RunDirError,
    read_verdict_manifest,
    read_verdicts,
    row_keys,
    verdict_tables,
)

# Angle regions for the examples: quarters of the circle centred on 0°, 90°, 180°, 270°.
REGIONS = ((0.0, "around 0°"), (90.0, "around 90°"), (180.0, "around 180°"), (270.0, "around 270°"))
EXAMPLES_PER_CELL = 2


@dataclass(frozen=True)
class LabelShare:
    table: str  # the verdict table's name (<judge>.<rubric>)
    dataset: str
    mask: str  # baseline | plain | adaptive
    angle: float | None
    label: str
    n: int  # rows in the cell
    share: float  # of those rows, the share with this label
    setting: str = ""  # "PLANE [WINDOW]" of a plane/window sweep (summary.setting_of)
    mean_prob: float | None = None  # mean P(label) over the cell's judged rows (verdict probs)


@dataclass(frozen=True)
class VerdictReport:
    name: str
    labels: tuple[str, ...]
    shares: list[LabelShare]
    plot_path: Path
    examples_path: Path
    rule: str | None  # the rubric's short-response rule, if any (stated in the outputs)
    truncated: int


def region_of(angle: float | None) -> str:
    if angle is None:
        return BASELINE
    centre = min(REGIONS, key=lambda r: abs((angle - r[0] + 180.0) % 360.0 - 180.0))
    return centre[1]


def label_shares(name: str, rows: pa.Table, verdicts: pa.Table, labels: Sequence[str]) -> list:
    """One LabelShare per (dataset, mask, angle, label) of the judged rows, in report order."""
    by_key = dict(
        zip(
            verdicts.column("row_key").to_pylist(),
            verdicts.column("label").to_pylist(),
            strict=True,
        )
    )
    keys = verdicts.column("row_key").to_pylist()
    # a hand-made table may carry labels only
    probs = verdicts.column("probs").to_pylist() if "probs" in verdicts.column_names else None
    probs_of = dict(zip(keys, probs or [None] * len(keys), strict=True))
    cells: dict[tuple[str, str, str, float | None], dict[str, int]] = defaultdict(
        lambda: defaultdict(int)
    )
    # per cell: summed P(label) and the number of rows with probabilities (the rule's have none)
    prob_sums: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    prob_rows: dict[tuple, int] = defaultdict(int)
    order: list[str] = []
    settings: list[str] = []
    cols = [rows.column(c).to_pylist() for c in ("dataset", "angle", "adaptive", "plane", "window")]
    for key, ds, angle, adaptive, plane, window in zip(row_keys(rows), *cols, strict=True):
        if key not in by_key:
            continue  # a partial verdict table: only judged rows count
        if ds not in order:
            order.append(ds)
        setting = setting_of(angle, plane, window)
        if setting not in settings:
            settings.append(setting)
        cell = (ds, mask_of(angle, adaptive), setting, angle)
        cells[cell][by_key[key]] += 1
        if probs_of[key] is not None:
            prob_rows[cell] += 1
            for lb, p in probs_of[key]:
                prob_sums[cell][lb] += p
    out = []
    for cell, counts in sorted(
        cells.items(),
        key=lambda kv: (
            order.index(kv[0][0]),
            MASK_ORDER.index(kv[0][1]),
            settings.index(kv[0][2]),
            -1.0 if kv[0][3] is None else kv[0][3],
        ),
    ):
        ds, mask, setting, angle = cell
        n, judged = sum(counts.values()), prob_rows[cell]
        out += [
            LabelShare(
                name,
                ds,
                mask,
                angle,
                lb,
                n,
                counts.get(lb, 0) / n,
                setting,
                prob_sums[cell][lb] / judged if judged else None,
            )
            for lb in labels
        ]
    return out


def steered_settings(shares: Sequence[LabelShare]) -> list[str]:
    """The (plane, window) settings of a sweep in first-seen order; [""] for a plain run."""
    return list(dict.fromkeys(s.setting for s in shares if s.mask != BASELINE)) or [""]


def write_shares_csv(shares: Sequence[LabelShare], path: Path) -> Path:
    sweep = any(s.setting for s in shares)  # the setting column only where there is one
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["table", "dataset", "mask", *(["setting"] if sweep else []), "angle"]
            + [
                "label",
                "n",
                "share",
                "mean_prob",
            ]
        )
        for s in shares:
            angle = "" if s.angle is None else f"{s.angle:g}"
            where = [s.setting] if sweep else []
            prob = "" if s.mean_prob is None else f"{s.mean_prob:.4f}"
            w.writerow(
                [s.table, s.dataset, s.mask, *where, angle, s.label, s.n, f"{s.share:.4f}", prob]
            )
    return path


def shares_markdown(report: VerdictReport) -> str:
    """Per mask, a row per angle (baseline first), a column per dataset × label."""
    shares = report.shares
    ds = list(dict.fromkeys(s.dataset for s in shares))
    by = {(s.dataset, s.mask, s.setting, s.angle, s.label): s for s in shares}
    out = [f"## verdicts {report.name}", ""]
    out.append(
        "Share of each label per dataset and angle, then (after /) the mean probability the "
        "judge gave that label over the rows it was asked; n rows per cell as in summary.md."
    )
    if report.rule:
        out.append(f"Rule: {report.rule}.")
    if report.truncated:
        out.append(f"{report.truncated} generation(s) were cut to fit the judge's context.")
    masks = [m for m in MASK_ORDER if m != BASELINE and any(s.mask == m for s in shares)]
    for setting in steered_settings(shares):
        for mask in masks or [BASELINE]:
            where = f"{setting}, " if setting else ""
            out += ["", f"### {where}{mask} mask" if mask != BASELINE else "### baseline only", ""]
            header = ["angle"] + [f"{d} {lb}" for d in ds for lb in report.labels]
            out += ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * len(header)) + "|"]
            angles = [None] + sorted(
                {
                    s.angle
                    for s in shares
                    if s.mask == mask and s.setting == setting and s.angle is not None
                }
            )
            for a in angles:
                key = (BASELINE, "") if a is None else (mask, setting)
                cells = [BASELINE if a is None else f"{a:g}°"]
                for d in ds:
                    for lb in report.labels:
                        s = by.get((d, *key, a, lb))
                        prob = "" if s is None or s.mean_prob is None else f" / {s.mean_prob:.2f}"
                        cells.append(f"{s.share:.2f}{prob}" if s else "")
                if any(cells[1:]):
                    out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def short_text(report: VerdictReport, max_angles: int = 12) -> str:
    """Console lines: per mask and dataset, the most common label at each angle."""
    shares = report.shares
    lines = [f"verdicts {report.name}: most common label (share) per angle"]
    groups = [(BASELINE, "")] + [
        (m, st)
        for st in steered_settings(shares)
        for m in MASK_ORDER
        if m != BASELINE and any(s.mask == m for s in shares)
    ]
    for mask, setting in groups:
        for d in dict.fromkeys(s.dataset for s in shares):
            cells: dict[float | None, LabelShare] = {}
            for s in shares:
                if s.dataset == d and s.mask == mask and s.setting == setting:
                    best = cells.get(s.angle)
                    if best is None or s.share > best.share:
                        cells[s.angle] = s
            angles = sorted(cells, key=lambda a: -1.0 if a is None else a)
            step = max(1, math.ceil(len(angles) / max_angles))
            shown = [
                f"{'base' if a is None else f'{a:g}°'} {cells[a].label} {cells[a].share:.2f}"
                for a in angles[::step]
            ]
            if shown:
                lines.append(f"  {mask}{f' {setting}' if setting else ''} {d}: " + "; ".join(shown))
    return "\n".join(lines)


def polar_plot(report: VerdictReport, path: Path, title: str) -> Path:
    """One panel per (mask, dataset), one line per label; baselines as dashed circles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = report.shares
    masks = [m for m in MASK_ORDER if m != BASELINE and any(s.mask == m for s in shares)]
    ds = list(dict.fromkeys(s.dataset for s in shares))
    # A row of panels per (setting, mask): a sweep's planes and windows side by side.
    lines = [(st, m) for st in steered_settings(shares) for m in masks] or [("", BASELINE)]
    panels = [(st, m, d) for st, m in lines for d in ds]
    fig, axes = plt.subplots(
        len(lines),
        len(ds),
        subplot_kw={"projection": "polar"},
        figsize=(4.6 * len(ds), 5.0 * len(lines) + 0.8),
        squeeze=False,
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    circle = [2 * math.pi * i / 360 for i in range(361)]
    for ax, (setting, mask, d) in zip(axes.flat, panels, strict=True):
        for i, lb in enumerate(report.labels):
            colour = colours[i % len(colours)]
            pts = sorted(
                (s.angle, s.share)
                for s in shares
                if s.dataset == d
                and s.mask == mask
                and s.setting == setting
                and s.label == lb
                and s.angle is not None
            )
            if pts:
                theta = [math.radians(a) for a, _ in pts]
                val = [v for _, v in pts]
                if len(pts) >= 3:
                    theta.append(theta[0] + 2 * math.pi)
                    val.append(val[0])
                ax.plot(theta, val, "-o", color=colour, markersize=2.5, linewidth=1.5, label=lb)
            base = next(
                (s for s in shares if s.dataset == d and s.mask == BASELINE and s.label == lb),
                None,
            )
            if base is not None and base.share > 0:
                ax.plot(circle, [base.share] * len(circle), "--", color=colour, linewidth=0.8)
        ax.set_ylim(0, 1.05)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0])
        ax.set_yticklabels(["0.25", "0.5", "0.75", "1"], fontsize=7)
        where = f"{setting}, " if setting else ""
        ax.set_title(
            f"{d}, {where}{mask}" if mask != BASELINE else f"{d}, baseline", pad=12, fontsize=10
        )
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8)
    note = "dashed: unsteered share" + (f"; {report.rule}" if report.rule else "")
    fig.suptitle(f"{title}\n{note}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.93), h_pad=4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def examples_markdown(name: str, rows: pa.Table, verdicts: pa.Table, labels: Sequence[str]) -> str:
    """Up to EXAMPLES_PER_CELL generations per (label, mask, angle region), first by row key."""
    by_key = dict(
        zip(
            verdicts.column("row_key").to_pylist(),
            verdicts.column("label").to_pylist(),
            strict=True,
        )
    )
    picked: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    keyed = sorted(zip(row_keys(rows), rows.to_pylist(), strict=True), key=lambda kr: kr[0])
    for key, r in keyed:
        label = by_key.get(key)
        if label is None:
            continue
        cell = picked[(label, mask_of(r["angle"], r["adaptive"]), region_of(r["angle"]))]
        if len(cell) < EXAMPLES_PER_CELL:
            cell.append(r)
    out = [f"# Example generations per label: {name}", ""]
    for lb in labels:
        out += [f"## {lb}", ""]
        cells = sorted((k, v) for k, v in picked.items() if k[0] == lb)
        if not cells:
            out += ["(no row got this label)", ""]
        for (_, mask, region), rs in cells:
            for r in rs:
                angle = "baseline" if r["angle"] is None else f"{r['angle']:g}°"
                text = r["generation"].replace("\n", " ").strip() or "(empty)"
                out.append(
                    f"- {mask}, {region} ({angle}, {r['dataset']}): "
                    f"_{r['instruction']}_ → {text[:300]}"
                )
        out.append("")
    return "\n".join(out)


def verdict_reports(
    run_dir: Path, rows: pa.Table, out: Path, title: str
) -> tuple[list[VerdictReport], list[str]]:
    """Every verdict table of the run, reported; (reports, warnings for tables left out)."""
    reports, warnings = [], []
    for name in verdict_tables(run_dir):
        try:
            verdicts = read_verdicts(run_dir, name, rows=rows)
        except RunDirError as e:
            warnings.append(f"verdict table {name} left out: {e}")
            continue
        vm = read_verdict_manifest(run_dir, name) or {}
        labels = tuple((vm.get("rubric") or {}).get("labels") or ())
        if not labels or verdicts.num_rows == 0:
            warnings.append(f"verdict table {name} left out: no labels or no verdicts yet")
            continue
        rep = VerdictReport(
            name=name,
            labels=labels,
            shares=label_shares(name, rows, verdicts, labels),
            plot_path=out / f"verdicts_{name}_polar.png",
            examples_path=out / f"verdicts_{name}_examples.md",
            rule=(vm.get("rules") or {}).get("short_response"),
            truncated=sum(verdicts.column("truncated").to_pylist()),
        )
        polar_plot(rep, rep.plot_path, f"{name} by angle — {title}")
        rep.examples_path.write_text(examples_markdown(name, rows, verdicts, labels))
        reports.append(rep)
    return reports, warnings
