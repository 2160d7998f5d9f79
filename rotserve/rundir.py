"""The run directory: the contract between the grid that writes it and everything that reads it.

    RUN_DIR/manifest.json              the resolved request, inputs' hashes, versions, counts
    RUN_DIR/rows/part-<shard>.parquet  one file per finished shard: THE TABLE (SCHEMA below)
    RUN_DIR/report/                    summary.csv, summary.md, refusal_polar.png
    RUN_DIR/_tmp/                      files being written, and the writer's lock

The grid (rotserve.grid) is the only writer of rows and manifest; the report (and any later
reader: judges, notebooks) imports this module and nothing of the grid. `rows/` only ever
holds complete part files, so `pandas.read_parquet(RUN_DIR/"rows")`,
`polars.read_parquet(RUN_DIR/"rows")` and DuckDB's `read_parquet('RUN_DIR/rows/*.parquet')`
read it as is (pandas and polars refuse a directory that also holds manifest.json).

Every file is published with `atomic_write`: written under `_tmp/`, flushed to disk, then
renamed into place (atomic on one filesystem), so a reader never sees half a file and a
crash leaves at most an orphan in `_tmp/` that no reader looks at.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "rotserve-grid/1"
MANIFEST = "manifest.json"
ROWS_DIR = "rows"
TMP_DIR = "_tmp"
REPORT_DIR = "report"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"

# One row per (prompt, condition, sample). Explicit types so every part file, and every run,
# has the same schema whatever the values (an all-null column must not turn into `null` type).
# docs/SCHEMA.md explains each column.
SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("plane_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("angle", pa.float64(), nullable=True),  # degrees in [0, 360); null = baseline
        pa.field("adaptive", pa.bool_(), nullable=False),
        pa.field("plane", pa.string(), nullable=True),  # the plane's name; null = baseline
        pa.field("window", pa.string(), nullable=True),  # the layer window; null = baseline
        pa.field("sample", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("temperature", pa.float64(), nullable=False),
        pa.field("max_tokens", pa.int32(), nullable=False),
        pa.field("generation", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("output_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=True),
        pa.field("refusal", pa.bool_(), nullable=False),
        pa.field("refusal_marker", pa.string(), nullable=True),
        pa.field("fluency", pa.float64(), nullable=False),
        pa.field("nll", pa.float64(), nullable=True),  # per token, under the unsteered model
        pa.field("perplexity", pa.float64(), nullable=True),  # exp(nll)
    ],
    metadata={"rotserve.schema": FORMAT},
)
# What makes a row unique within a run.
KEY_COLUMNS = ("dataset", "prompt_id", "angle", "adaptive", "plane", "window", "sample")


class RunDirError(ValueError):
    """A directory that is not (or not this) run directory, or whose files cannot be trusted."""


def part_name(shard_id: str) -> str:
    return f"{PART_PREFIX}{shard_id}{PART_SUFFIX}"


def shard_of_part(name: str) -> str | None:
    """`part-<shard>.parquet` -> shard id; None for any other file name."""
    if name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX):
        return name[len(PART_PREFIX) : -len(PART_SUFFIX)]
    return None


def part_files(run_dir: str | Path) -> list[Path]:
    rows = Path(run_dir) / ROWS_DIR
    return sorted(rows.glob(f"{PART_PREFIX}*{PART_SUFFIX}")) if rows.is_dir() else []


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by SCHEMA names) as a table with exactly SCHEMA; extra keys dropped."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def read_rows(run_dir: str | Path) -> pa.Table:
    """Every finished row of a run (the complete table once the run is complete)."""
    files = part_files(run_dir)
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=SCHEMA) for f in files)


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's manifest, or None if the directory has none (yet)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(
            f"{path} is not valid JSON ({e}); not a rotserve run directory?"
        ) from None


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], tmp_dir: Path) -> Path:
    """Publish `path` whole or not at all: write(file) under tmp_dir, fsync, rename."""
    tmp = tmp_dir / f"{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # the rename must not publish a file whose bytes are not on disk
    os.replace(tmp, path)
    return path
