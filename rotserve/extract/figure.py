"""The evidence figure of an extraction: per-site statistics and the candidates in the plane.

Panels: ||r|| per site, mean cosine per site, held-out separability (AUROC and Cohen's d) per
site, each with the chosen site marked and the --layers window shaded; then every candidate
d_i drawn at (d_i . b1, d_i . b2), i.e. where it lies in the steering plane (the unit circle is
where a candidate lying wholly inside the plane would sit).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rotserve.extract.candidates import CandidateStat  # noqa: E402

KIND_STYLE = {"resid_mid": ("o", "tab:blue"), "resid_post": ("s", "tab:orange")}


def candidates_figure(
    table: Sequence[CandidateStat],
    plane_coords: np.ndarray,
    out: str | Path,
    title: str = "",
) -> Path:
    """Write the PNG; plane_coords is [sites, 2] = (d_i . b1, d_i . b2)."""
    out = Path(out)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    (ax_norm, ax_cos), (ax_sep, ax_plane) = axes
    depth = np.array([r.depth for r in table])
    chosen = [i for i, r in enumerate(table) if r.chosen]
    window = [r.depth for r in table if r.in_window]

    def per_site(ax: plt.Axes, values: Sequence[float | None], label: str) -> None:
        for kind, (marker, color) in KIND_STYLE.items():
            idx = [i for i, r in enumerate(table) if r.kind == kind]
            ys = [np.nan if values[i] is None else values[i] for i in idx]
            ax.plot(depth[idx], ys, marker=marker, color=color, label=kind, lw=1.2, ms=4)
        _decorate(ax, table, window, chosen, values)
        ax.set_ylabel(label)

    per_site(ax_norm, [r.norm for r in table], "||r|| = ||mean harmful - mean harmless||")
    ax_norm.set_title("difference of unit means")
    ax_norm.legend(loc="best", fontsize=8)
    per_site(ax_cos, [r.mean_cosine for r in table], "mean cosine to the candidates")
    ax_cos.set_title("agreement between candidates (max_sim)")

    aurocs = [r.auroc for r in table]
    if any(a is not None for a in aurocs):
        per_site(ax_sep, aurocs, "held-out AUROC")
        # Zoom to the data: on a model that has learned the concept every AUROC is near 1, and
        # the differences that decide are in the third decimal.
        lo = float(np.nanmin([a for a in aurocs if a is not None]))
        pad = max(0.002, 0.1 * (1.0 - lo))
        ax_sep.set_ylim(lo - pad, 1.0 + pad)
        ax_d = ax_sep.twinx()
        ds = [np.nan if r.cohens_d is None else r.cohens_d for r in table]
        ax_d.plot(depth, ds, color="tab:green", ls="--", lw=1, marker=".", label="Cohen's d")
        ax_d.set_ylabel("Cohen's d", color="tab:green")
        ax_sep.set_title("held-out separability (AUROC decides, Cohen's d breaks ties)")
    else:
        ax_sep.text(0.5, 0.5, "no held-out split (--holdout 0)", ha="center", va="center")
        ax_sep.set_title("held-out separability")
    ax_sep.set_xlabel("depth (layers; resid_mid at +0.5, resid_post at +1)")
    ax_norm.set_xlabel("depth (layers)")
    ax_cos.set_xlabel("depth (layers)")

    theta = np.linspace(0, 2 * np.pi, 361)
    ax_plane.plot(np.cos(theta), np.sin(theta), color="0.8", lw=1)
    ax_plane.axhline(0, color="0.85", lw=0.8)
    ax_plane.axvline(0, color="0.85", lw=0.8)
    sc = ax_plane.scatter(
        plane_coords[:, 0], plane_coords[:, 1], c=depth, cmap="viridis", s=28, zorder=3
    )
    for i in chosen:
        ax_plane.scatter(
            *plane_coords[i], s=160, facecolors="none", edgecolors="red", lw=1.8, zorder=4
        )
        ax_plane.annotate(
            table[i].site,
            plane_coords[i],
            textcoords="offset points",
            xytext=(-30, 12),
            fontsize=8,
            color="red",
        )
    # Name the candidates that point well away from b1: where a sweep's refusal peak sits
    # off 0 degrees, it is usually at one of these.
    angles = np.degrees(np.arctan2(plane_coords[:, 1], plane_coords[:, 0])) % 360
    for i in np.flatnonzero(np.minimum(angles, 360 - angles) > 30):
        if i not in chosen:
            ax_plane.annotate(
                f"{table[i].site} ({angles[i]:.0f}°)",
                plane_coords[i],
                textcoords="offset points",
                xytext=(6, -10),
                fontsize=8,
            )
    ax_plane.annotate(
        "b1 (0°)", (1.0, 0), textcoords="offset points", xytext=(-14, -14), fontsize=8
    )
    ax_plane.annotate("b2 (90°)", (0, 1.0), textcoords="offset points", xytext=(4, 2), fontsize=8)
    ax_plane.set_aspect("equal")
    ax_plane.set_xlim(-1.15, 1.15)
    ax_plane.set_ylim(-1.15, 1.15)
    ax_plane.set_xlabel("d_i · b1")
    ax_plane.set_ylabel("d_i · b2")
    ax_plane.set_title("candidates projected onto the plane")
    fig.colorbar(sc, ax=ax_plane, label="depth (layers)", shrink=0.8)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _decorate(
    ax: plt.Axes,
    table: Sequence[CandidateStat],
    window: Sequence[float],
    chosen: Sequence[int],
    values: Sequence[float | None],
) -> None:
    if window and len(window) < len(table):
        ax.axvspan(min(window) - 0.25, max(window) + 0.25, color="0.92", zorder=0, label="window")
    for i in chosen:
        v = values[i]
        ax.axvline(table[i].depth, color="red", lw=0.8, ls=":")
        if v is not None:
            ax.scatter(
                [table[i].depth], [v], s=140, facecolors="none", edgecolors="red", lw=1.6, zorder=4
            )
    ax.grid(alpha=0.3)
