"""Checks on a run's table that several tests share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from rotserve.rundir import KEY_COLUMNS


def expect_unique_keys(table: pa.Table, keys: Iterable[str] = KEY_COLUMNS) -> None:
    """Fail if a (dataset, prompt_id, angle, adaptive, sample) key appears twice."""
    cols = [table.column(k).to_pylist() for k in keys]
    seen: set[tuple[Any, ...]] = set()
    for key in zip(*cols, strict=True):
        assert key not in seen, f"row key {key} appears twice"
        seen.add(key)
