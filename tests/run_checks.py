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


# The grid CLI, but SIGKILL to its whole process group right after the k-th part is published
# (KILL_AFTER_PARTS in the environment): the kill lands mid-run every time, at a known point,
# with more shards in flight. Run it with start_new_session=True so the group is its own.
KILLED_CLI = """
import os, signal, sys
from rotserve.grid import store
from rotserve.grid.cli import main

publish, published = store.RunStore.write_part, []

def publish_then_die(self, shard_id, table):
    path = publish(self, shard_id, table)
    published.append(shard_id)
    if len(published) == int(os.environ["KILL_AFTER_PARTS"]):
        os.killpg(0, signal.SIGKILL)  # the driver, its local Ray cluster and engines, at once
    return path

store.RunStore.write_part = publish_then_die
sys.exit(main(sys.argv[1:]))
"""
