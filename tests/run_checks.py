"""Checks on a run's table that several tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
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


# A job's command line that SIGKILLs its own process group (driver, local Ray cluster, engines)
# right after the $KILL_AFTER_PARTS-th part is published: the kill lands mid-run every time, at
# a known point, with more shards in flight. Run it with start_new_session=True, so the group
# it kills is its own and not pytest's.
_KILLED_CLI = """
import os, signal, sys
from {store_module} import {store_class} as Store
from {cli_module} import main

publish, published = Store.write_part, []

def publish_then_die(self, shard_id, table):
    path = publish(self, shard_id, table)
    published.append(shard_id)
    if len(published) == int(os.environ["KILL_AFTER_PARTS"]):
        os.killpg(0, signal.SIGKILL)
    return path

Store.write_part = publish_then_die
sys.exit(main(sys.argv[1:]))
"""


def run_killed_job(
    store: str, cli_module: str, args: list[str], kill_after: int, cwd: Path, timeout: float
) -> subprocess.CompletedProcess:
    """Run a job's CLI (`cli_module`) that is SIGKILLed right after its `kill_after`-th part
    (published by `store`, "module:Class"); fail unless the kill happened."""
    module, cls = store.split(":")
    script = _KILLED_CLI.format(store_module=module, store_class=cls, cli_module=cli_module)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "KILL_AFTER_PARTS": str(kill_after)}
    killed = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        start_new_session=True,  # its own process group: the one it kills
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    return killed
