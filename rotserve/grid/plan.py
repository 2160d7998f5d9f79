"""The grid as work: (dataset, prompt, condition) units cut into deterministic shards. Pure.

A condition is an angle plus a mask (plain or adaptive), a plane and a layer window, or
the baseline (no rotation, angle None). Units are laid out prompt-major, conditions innermost, and cut into consecutive
shards of `shard_size` units: each shard holds a few prompts at every angle, so one
generate() call mixes many angles in its batches (the point of per-request steering), and the
engine sees every angle in every shard.

The plan is a pure function of the resolved request: the same request always yields the same
shards with the same ids and contents, and that is what makes resume and exactly-once work (a
part file named by shard id holds exactly that shard's rows, whoever wrote it and when).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from rotserve.grid.config import PromptSet
from rotserve.rundir import ALL_LAYERS, DEFAULT_PLANE, is_default_setting


@dataclass(frozen=True)
class Condition:
    """How a unit is steered: an angle in degrees, a mask (plain or adaptive), a plane and a layer window,
    or the baseline."""

    angle: float | None  # None = no steering (baseline); never confused with 0°
    adaptive: bool  # the baseline carries False: no rotation, so no mask either
    plane: str | None = None  # the plane's name; None for the baseline
    window: str | None = None  # canonical layer window ("all", "3:9", "4,5"); None = baseline

    @property
    def label(self) -> str:
        if self.angle is None:
            return "baseline"
        return f"{self.angle:g}° {'adaptive' if self.adaptive else 'plain'} {self.plane} [{self.window}]"


@dataclass(frozen=True)
class WorkUnit:
    """One prompt under one condition; it yields `samples` rows (sample 0..samples-1)."""

    dataset: str
    prompt_id: str
    instruction: str
    category: str
    condition: Condition

    def key(self) -> tuple[str, str, float | None, bool, str | None, str | None]:
        c = self.condition
        return (self.dataset, self.prompt_id, c.angle, c.adaptive, c.plane, c.window)


@dataclass(frozen=True)
class Shard:
    """A deterministic slice of the plan; its rows go to one part file named after its id."""

    index: int
    units: tuple[WorkUnit, ...]
    samples: int

    @property
    def shard_id(self) -> str:
        return f"{self.index:05d}"

    @property
    def n_rows(self) -> int:
        return len(self.units) * self.samples


@dataclass(frozen=True)
class GridPlan:
    shards: tuple[Shard, ...]
    conditions: tuple[Condition, ...]
    samples: int
    fingerprint: str  # hash of every unit key in order: two plans with it equal are the same work

    @property
    def n_units(self) -> int:
        return sum(len(s.units) for s in self.shards)

    @property
    def n_rows(self) -> int:
        return sum(s.n_rows for s in self.shards)

    def shard(self, shard_id: str) -> Shard:
        return self.shards[int(shard_id)]


def conditions(
    angles: Sequence[float],
    adaptive_masks: Sequence[bool],
    baseline: bool,
    planes: Sequence[str] = (DEFAULT_PLANE,),
    windows: Sequence[str] = (ALL_LAYERS,),
) -> tuple[Condition, ...]:
    """Baseline first (if asked), then every plane x window x mask x angle."""
    out = [Condition(None, False)] if baseline else []
    out += [
        Condition(float(a), bool(m), plane, window)
        for plane in planes
        for window in windows
        for m in adaptive_masks
        for a in angles
    ]
    return tuple(out)


def make_plan(
    prompt_sets: Sequence[PromptSet],
    conds: Sequence[Condition],
    shard_size: int,
    samples: int = 1,
) -> GridPlan:
    if shard_size < 1 or samples < 1:
        raise ValueError(f"shard_size and samples must be >= 1, got {shard_size}, {samples}")
    units = [
        WorkUnit(ps.label, p.id, p.instruction, p.category, c)
        for ps in prompt_sets
        for p in ps.prompts
        for c in conds
    ]
    shards = tuple(
        Shard(index=i, units=tuple(units[start : start + shard_size]), samples=samples)
        for i, start in enumerate(range(0, len(units), shard_size))
    )
    h = hashlib.sha256()
    for u in units:
        key = list(u.key())
        if is_default_setting(u.condition.plane, u.condition.window):
            key = key[:-2]  # single-plane, every-layer plans keep their fingerprint
        h.update(json.dumps([*key, u.instruction]).encode() + b"\n")
    h.update(f"samples={samples};shard_size={shard_size}".encode())
    return GridPlan(
        shards=shards, conditions=tuple(conds), samples=samples, fingerprint=h.hexdigest()[:16]
    )
