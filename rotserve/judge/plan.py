"""The judge's work: one item per grid row, cut into deterministic shards. Pure.

Items are ordered by row key, so the plan depends on which rows the run holds, not on how its
part files are laid out; the same run, rubric and judge settings always give the same shards
with the same ids, which is what makes resume and exactly-once work (as in the grid).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class JudgeItem:
    """One row to judge: its key and the judge's prompt, or the label the rubric's rule gave.

    The prompt's token ids are kept as packed int32 bytes: a plan holds every row of a run
    (100k rows of ~700 tokens would be ~2 GB as Python ints, 280 MB packed).
    """

    row_key: str
    tokens: bytes  # array("i") bytes of the prompt's token ids; empty when rule_label is set
    truncated: bool
    rule_label: str | None = None

    @classmethod
    def of(
        cls,
        row_key: str,
        token_ids: Sequence[int],
        truncated: bool = False,
        rule_label: str | None = None,
    ) -> JudgeItem:
        return cls(row_key, array("i", token_ids).tobytes(), truncated, rule_label)

    @property
    def token_ids(self) -> list[int]:
        return array("i", self.tokens).tolist()

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) // array("i").itemsize


@dataclass(frozen=True)
class JudgeShard:
    index: int
    items: tuple[JudgeItem, ...]

    @property
    def shard_id(self) -> str:
        return f"{self.index:05d}"

    @property
    def n_rows(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class JudgePlan:
    shards: tuple[JudgeShard, ...]
    fingerprint: str  # hash of every item (key, prompt ids, rule) in order

    @property
    def n_rows(self) -> int:
        return sum(s.n_rows for s in self.shards)

    def shard(self, shard_id: str) -> JudgeShard:
        return self.shards[int(shard_id)]


def make_judge_plan(items: Sequence[JudgeItem], shard_size: int) -> JudgePlan:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ordered = sorted(items, key=lambda it: it.row_key)
    keys = [it.row_key for it in ordered]
    if len(set(keys)) != len(keys):
        raise ValueError("two rows share a row key: the run's rows are not unique")
    h = hashlib.sha256()
    for it in ordered:
        h.update(f"{it.row_key}|{it.rule_label}|".encode() + it.tokens + b"\n")
    h.update(f"shard_size={shard_size}".encode())
    shards = tuple(
        JudgeShard(i, tuple(ordered[start : start + shard_size]))
        for i, start in enumerate(range(0, len(ordered), shard_size))
    )
    return JudgePlan(shards=shards, fingerprint=h.hexdigest()[:16])
