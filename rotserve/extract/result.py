"""What an extraction returns: the plane, the evidence behind it, and its text summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rotserve.extract.candidates import HARMFUL, HARMLESS, Candidates, CandidateStat, Site
from rotserve.extract.config import ExtractConfig
from rotserve.plane import Plane

# A candidate this far from b1 inside the plane is flagged in the summary: when one layer
# decides alone, its candidate sits far from the others and the refusal peak of a sweep lands
# near that candidate's angle instead of 0 degrees (docs/DESIGN.md, "Which statistic picks b1").
OFF_PLANE_DEGREES = 30


@dataclass
class ExtractionResult:
    """The plane, every candidate's statistics, and where the files went."""

    plane: Plane
    table: list[CandidateStat]
    sites: list[Site]
    candidates: Candidates  # from all prompts
    config: ExtractConfig
    chosen: int | None  # index into sites/table of b1's site; None for mean / random
    paths: dict[str, Path] = field(default_factory=dict)
    reason: str = ""
    second_info: dict[str, Any] = field(default_factory=dict)
    controls: dict[str, Path] = field(default_factory=dict)  # name -> control plane file

    def summary(self) -> str:
        """A few lines: the data, which site b1 came from and why, b2, outliers, the files."""
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
            if r.plane_angle is not None
            and min(r.plane_angle, 360 - r.plane_angle) > OFF_PLANE_DEGREES
        ]
        if off and not self.config.random_b1:
            lines.append(
                f"  candidates more than {OFF_PLANE_DEGREES}° from b1 in the plane: "
                f"{', '.join(off)}"
            )
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
