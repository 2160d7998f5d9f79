"""Per-angle summary of a grid run: refusal rate, output length, fluency and coherence per condition.

Uses pyarrow and the standard library only (pandas is a dev extra, not a dependency).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa

from rotserve.rundir import is_default_setting

BASELINE = "baseline"
MASK_ORDER = (BASELINE, "plain", "adaptive")
REFUSING = 0.5  # an angle "refuses" for a dataset when at least half its rows are refusals


@dataclass(frozen=True)
class SummaryRow:
    dataset: str
    mask: str  # baseline | plain | adaptive
    angle: float | None  # degrees; None for the baseline
    n: int
    refusal_rate: float
    mean_output_tokens: float
    mean_fluency: float
    mean_nll: float | None = None  # per token, under the unsteered model (rows that have it)
    perplexity: float | None = None  # exp(mean_nll)
    # "PLANE [WINDOW]" of a plane/window sweep; "" for the baseline and for a run with one
    # plane steering every layer (whose report reads as before sweeps existed).
    setting: str = ""


def setting_of(angle: float | None, plane: str | None, window: str | None) -> str:
    if angle is None or is_default_setting(plane, window):
        return ""
    return f"{plane} [{window}]"


def settings(rows: Sequence[SummaryRow]) -> list[str]:
    """The (plane, window) settings of the steered rows, first-seen order."""
    return list(dict.fromkeys(r.setting for r in rows if r.mask != BASELINE))


def by_setting(rows: Sequence[SummaryRow]) -> list[tuple[str, list[SummaryRow]]]:
    """Each setting's rows plus the baseline rows, so every per-setting view has its
    reference; a single unnamed setting gives [("", rows)]."""
    base = [r for r in rows if r.mask == BASELINE]
    return [
        (s, base + [r for r in rows if r.mask != BASELINE and r.setting == s])
        for s in settings(rows)
    ] or [("", list(rows))]


def mask_of(angle: float | None, adaptive: bool) -> str:
    if angle is None:
        return BASELINE
    return "adaptive" if adaptive else "plain"


def summarize(table: pa.Table) -> list[SummaryRow]:
    """One SummaryRow per (dataset, mask, angle), datasets in first-seen order, baseline first."""
    names = ("dataset", "angle", "adaptive", "refusal", "output_tokens", "fluency", "nll")
    cols = {name: table.column(name).to_pylist() for name in names}
    # Runs written before plane/window sweeps have neither column: one unnamed setting.
    n_rows = table.num_rows
    planes = table.column("plane").to_pylist() if "plane" in table.column_names else [None] * n_rows
    windows = (
        table.column("window").to_pylist() if "window" in table.column_names else [None] * n_rows
    )
    # n, refusals, tokens, fluency, nll sum, rows with an nll
    acc: dict[tuple[str, str, str, float | None], list[float]] = defaultdict(lambda: [0.0] * 6)
    order: list[str] = []
    setting_order: list[str] = []
    for ds, angle, adaptive, refused, tokens, flu, nll, plane, window in zip(
        *cols.values(), planes, windows, strict=True
    ):
        if ds not in order:
            order.append(ds)
        setting = setting_of(angle, plane, window)
        if setting not in setting_order:
            setting_order.append(setting)
        a = acc[(ds, mask_of(angle, adaptive), setting, angle)]
        a[0] += 1
        a[1] += bool(refused)
        a[2] += tokens
        a[3] += flu
        if nll is not None:
            a[4] += nll
            a[5] += 1
    rows = []
    for (ds, mask, setting, angle), (n, r, t, f, nll_sum, n_nll) in acc.items():
        mean_nll = nll_sum / n_nll if n_nll else None
        ppl = math.exp(min(mean_nll, 700.0)) if mean_nll is not None else None
        rows.append(
            SummaryRow(ds, mask, angle, int(n), r / n, t / n, f / n, mean_nll, ppl, setting)
        )
    rows.sort(
        key=lambda s: (
            order.index(s.dataset),
            MASK_ORDER.index(s.mask),
            setting_order.index(s.setting),
            -1.0 if s.angle is None else s.angle,
        )
    )
    return rows


def write_csv(rows: Sequence[SummaryRow], path: Path) -> Path:
    names = [f.name for f in fields(SummaryRow)]
    if not any(r.setting for r in rows):
        names.remove("setting")  # a run without plane/window sweeps: the columns it always had
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d["angle"] = "" if r.angle is None else f"{r.angle:g}"
            for k in (
                "refusal_rate",
                "mean_output_tokens",
                "mean_fluency",
                "mean_nll",
                "perplexity",
            ):
                d[k] = "" if d[k] is None else f"{d[k]:.4f}"
            w.writerow(d)
    return path


def _angle(a: float | None) -> str:
    return BASELINE if a is None else f"{a:g}°"


def datasets(rows: Sequence[SummaryRow]) -> list[str]:
    return list(dict.fromkeys(r.dataset for r in rows))


def masks(rows: Sequence[SummaryRow]) -> list[str]:
    present = {r.mask for r in rows}
    return [m for m in MASK_ORDER if m in present and m != BASELINE]


def markdown(rows: Sequence[SummaryRow], title: str = "") -> str:
    """One wide table per mask (and per plane/window setting of a sweep): a row per angle
    (baseline first), three columns per dataset."""
    groups = by_setting(rows)
    if len(groups) > 1 or groups[0][0]:
        out = [f"# {title}", ""] if title else []
        for setting, subset in groups:
            out.append(_markdown(subset, f"{setting}", level="##").rstrip("\n"))
            out.append("")
        return "\n".join(out)
    return _markdown(rows, title)


def _markdown(rows: Sequence[SummaryRow], title: str = "", level: str = "#") -> str:
    ds = datasets(rows)
    by = {(r.dataset, r.mask, r.angle): r for r in rows}
    out = [f"{level} {title}", ""] if title else []
    sub = level + "#"
    out.append(
        "Refusal rate (substring markers), mean fluency (0-1), mean NLL per token of the "
        "generation under the unsteered model (nats; higher = less coherent) and mean output "
        "tokens per dataset; n = rows per cell: "
        + ", ".join(f"{d} {_n(rows, d)}" for d in ds)
        + "."
    )
    for mask in masks(rows) or [BASELINE]:
        out += ["", f"{sub} {mask} mask" if mask != BASELINE else f"{sub} baseline only", ""]
        kinds = ("refusal", "fluency", "nll", "tokens")
        header = ["angle"] + [f"{d} {k}" for d in ds for k in kinds]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---:"] * len(header)) + "|")
        angles = [None] + sorted({r.angle for r in rows if r.mask == mask and r.angle is not None})
        for a in angles:
            cells = [_angle(a)]
            for d in ds:
                r = by.get((d, BASELINE if a is None else mask, a))
                cells += (
                    [
                        f"{r.refusal_rate:.2f}",
                        f"{r.mean_fluency:.2f}",
                        "-" if r.mean_nll is None else f"{r.mean_nll:.2f}",
                        f"{r.mean_output_tokens:.1f}",
                    ]
                    if r
                    else ["", "", "", ""]
                )
            if any(cells[1:]):
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _n(rows: Sequence[SummaryRow], dataset: str) -> str:
    ns = sorted({r.n for r in rows if r.dataset == dataset})
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def refusal_arcs(
    points: Sequence[tuple[float, float]], threshold: float = REFUSING
) -> list[tuple[float, float]]:
    """Arcs (first, last angle) where the rate is >= threshold, joined across 0°."""
    pts = sorted(points)
    if not pts:
        return []
    flags = [rate >= threshold for _, rate in pts]
    if all(flags):
        return [(pts[0][0], pts[-1][0])]
    # start scanning just after a non-refusing angle so an arc through 0° stays whole
    start = flags.index(False) + 1
    arcs: list[tuple[float, float]] = []
    current: list[float] = []
    for i in range(len(pts)):
        j = (start + i) % len(pts)
        if flags[j]:
            current.append(pts[j][0])
        elif current:
            arcs.append((current[0], current[-1]))
            current = []
    if current:
        arcs.append((current[0], current[-1]))
    return arcs


def short_text(rows: Sequence[SummaryRow], max_angles: int = 24) -> str:
    """The console summary: per mask and dataset, where it refuses; then a compact angle table
    (one block per plane/window setting of a sweep)."""
    groups = by_setting(rows)
    if len(groups) > 1 or groups[0][0]:
        return "\n\n".join(
            f"== {setting} ==\n" + _short_text(subset, max_angles) for setting, subset in groups
        )
    return _short_text(rows, max_angles)


def _short_text(rows: Sequence[SummaryRow], max_angles: int = 24) -> str:
    ds = datasets(rows)
    by = {(r.dataset, r.mask, r.angle): r for r in rows}
    lines: list[str] = []
    for d in ds:
        base = by.get((d, BASELINE, None))
        if base:
            lines.append(
                f"{d}: baseline refusal {base.refusal_rate:.2f}, "
                f"fluency {base.mean_fluency:.2f} (n={base.n})"
            )
    for mask in masks(rows):
        lines += ["", f"{mask} mask:"]
        for d in ds:
            pts = [(r.angle, r.refusal_rate) for r in rows if r.dataset == d and r.mask == mask]
            if not pts:
                continue
            hi = max(pts, key=lambda p: p[1])
            lo = min(pts, key=lambda p: p[1])
            arcs = refusal_arcs(pts)
            where = ", ".join(f"{a:g}°" if a == b else f"{a:g}°–{b:g}°" for a, b in arcs)
            lines.append(
                f"  {d}: refuses (≥{REFUSING:.0%}) {'at ' + where if where else 'nowhere'}; "
                f"max {hi[1]:.2f} at {hi[0]:g}°, "
                f"min {lo[1]:.2f} at {lo[0]:g}°"
            )
        angles = sorted({r.angle for r in rows if r.mask == mask and r.angle is not None})
        step = max(1, math.ceil(len(angles) / max_angles))
        shown = angles[::step]
        note = f" (one angle in {step}; all of them in summary.md)" if step > 1 else ""
        width = max(10, *(len(d) for d in ds))
        lines.append(f"  refusal rate (fluency){note}")
        lines.append("  " + "angle".rjust(9) + "".join(d.rjust(width + 4) for d in ds))
        for a in [None, *shown]:
            cells = []
            for d in ds:
                r = by.get((d, BASELINE if a is None else mask, a))
                cells.append(
                    (f"{r.refusal_rate:.2f} ({r.mean_fluency:.2f})" if r else "-").rjust(width + 4)
                )
            lines.append("  " + _angle(a).rjust(9) + "".join(cells))
    return "\n".join(lines)
