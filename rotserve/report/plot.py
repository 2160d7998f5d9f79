"""Polar plot of refusal rate against steering angle: one panel per mask, one trace per dataset.

The baseline (no steering) rate of each dataset is drawn as a dashed circle in the trace's
colour, so "steering raised/lowered refusal" reads as inside/outside the circle.

A plane/window sweep instead gets one panel per (dataset, mask) with one trace per
(plane, window) setting, overlaid, and the dataset's baseline as a dashed black circle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rotserve.report.summary import BASELINE, SummaryRow, datasets, masks, settings


def polar_plot(rows: Sequence[SummaryRow], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    named = settings(rows)
    if len(named) > 1 or (named and named[0]):
        return _settings_plot(plt, rows, named, path, title)

    panels = masks(rows)
    if not panels:  # baseline-only run: nothing to draw against angle; still write a plot
        panels = [BASELINE]
    fig, axes = plt.subplots(
        1,
        len(panels),
        subplot_kw={"projection": "polar"},
        figsize=(5.2 * len(panels), 5.6),
        squeeze=False,
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    circle = [2 * math.pi * i / 360 for i in range(361)]
    for ax, mask in zip(axes[0], panels, strict=True):
        for i, d in enumerate(datasets(rows)):
            colour = colours[i % len(colours)]
            pts = sorted(
                (r.angle, r.refusal_rate) for r in rows if r.dataset == d and r.mask == mask
            )
            if pts:
                theta = [math.radians(a) for a, _ in pts]
                rate = [r for _, r in pts]
                if len(pts) >= 3:  # close the loop through 360° = 0°
                    theta.append(theta[0] + 2 * math.pi)
                    rate.append(rate[0])
                ax.plot(theta, rate, "-o", color=colour, markersize=3, linewidth=1.6, label=d)
            base = next((r for r in rows if r.dataset == d and r.mask == BASELINE), None)
            if base is not None:
                ax.plot(
                    circle,
                    [base.refusal_rate] * len(circle),
                    "--",
                    color=colour,
                    linewidth=1.0,
                    alpha=0.8,
                    label=f"{d} baseline ({base.refusal_rate:.2f})",
                )
        ax.set_ylim(0, 1.05)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0])
        ax.set_yticklabels(["0.25", "0.5", "0.75", "1"], fontsize=7)
        ax.set_title(f"{mask} mask" if mask != BASELINE else "baseline", pad=14)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = max(1, min(len(labels), 2 * len(panels)))  # two entries (trace, baseline) per dataset
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(title or "refusal rate by steering angle (0° = toward refusal)", fontsize=11)
    fig.tight_layout(rect=(0, 0.035 + 0.04 * rows, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _settings_plot(
    plt: Any, rows: Sequence[SummaryRow], named: list[str], path: Path, title: str
) -> Path:
    """A panel per (dataset, mask), a trace per (plane, window) setting."""
    ds, panels = datasets(rows), masks(rows)
    fig, axes = plt.subplots(
        len(ds),
        len(panels),
        subplot_kw={"projection": "polar"},
        figsize=(5.2 * len(panels), 5.0 * len(ds) + 0.8),
        squeeze=False,
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    circle = [2 * math.pi * i / 360 for i in range(361)]
    for row_axes, d in zip(axes, ds, strict=True):
        base = next((r for r in rows if r.dataset == d and r.mask == BASELINE), None)
        for ax, mask in zip(row_axes, panels, strict=True):
            for i, setting in enumerate(named):
                pts = sorted(
                    (r.angle, r.refusal_rate)
                    for r in rows
                    if r.dataset == d and r.mask == mask and r.setting == setting
                )
                if not pts:
                    continue
                theta = [math.radians(a) for a, _ in pts]
                rate = [r for _, r in pts]
                if len(pts) >= 3:
                    theta.append(theta[0] + 2 * math.pi)
                    rate.append(rate[0])
                ax.plot(theta, rate, "-o", color=colours[i % len(colours)], markersize=3,
                        linewidth=1.4, label=setting)  # fmt: skip
            if base is not None:
                ax.plot(circle, [base.refusal_rate] * len(circle), "--", color="black",
                        linewidth=1.0, alpha=0.7, label="baseline")  # fmt: skip
            ax.set_ylim(0, 1.05)
            ax.set_yticks([0.25, 0.5, 0.75, 1.0])
            ax.set_yticklabels(["0.25", "0.5", "0.75", "1"], fontsize=7)
            ax.set_title(f"{d}, {mask} mask", pad=14)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = max(1, min(len(labels), 4))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(title or "refusal rate by steering angle (0° = toward refusal)", fontsize=11)
    fig.tight_layout(rect=(0, 0.035 + 0.03 * -(-len(labels) // ncol), 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
