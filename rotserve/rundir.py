"""The run directory: the contract between the grid that writes it and everything that reads it.

    RUN_DIR/manifest.json              the resolved request, inputs' hashes, versions, counts
    RUN_DIR/rows/part-<shard>.parquet  one file per finished shard: THE TABLE (SCHEMA below)
    RUN_DIR/report/                    summary.csv, summary.md, refusal_polar.png
    RUN_DIR/verdicts/<name>/part-*.parquet   a judge's verdicts (VERDICT_SCHEMA), one table per
    RUN_DIR/verdicts/<name>.json             (judge, rubric); its manifest beside it
    RUN_DIR/_tmp/                      files being written, and the writers' locks

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

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "rotserve-grid/2"  # 2: plane, window, nll, perplexity, row_key
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
        # row_key(run_id, KEY_COLUMNS values): what verdict tables join on; set by to_table
        pa.field("row_key", pa.string(), nullable=False),
    ],
    metadata={"rotserve.schema": FORMAT},
)
# What makes a row unique within a run.
KEY_COLUMNS = ("dataset", "prompt_id", "angle", "adaptive", "plane", "window", "sample")

# The setting of a run with one plane steered at every layer: rows of such runs (and of every
# run before sweeps) carry these names, and their run ids, plan fingerprints and report
# labels are the ones they had before planes and windows were key columns. The plane's name
# is rotserve.steering.DEFAULT_PLANE (spelled here too so that readers of a run directory
# need not import torch; a test keeps the two equal).
DEFAULT_PLANE = "default"
ALL_LAYERS = "all"


def is_default_setting(plane: str | None, window: str | None) -> bool:
    """The run's one plane at every layer, or the baseline (no plane, no window)."""
    return (plane, window) in ((None, None), (DEFAULT_PLANE, ALL_LAYERS))


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
    return part_files_in(Path(run_dir) / ROWS_DIR)


def part_files_in(folder: Path) -> list[Path]:
    """The part files of one table folder (rows/ or a verdict table), in shard order."""
    return sorted(folder.glob(f"{PART_PREFIX}*{PART_SUFFIX}")) if folder.is_dir() else []


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by SCHEMA names) as a table with exactly SCHEMA; extra keys dropped.

    `row_key` is computed here from each row's run_id and KEY_COLUMNS, so every writer of
    rows keys them the same way."""
    # .get: a column missing from a row dict is null in the table too (pa.Table.from_pylist)
    keyed = [{**r, "row_key": row_key(r["run_id"], [r.get(k) for k in KEY_COLUMNS])} for r in rows]
    return pa.Table.from_pylist(keyed, schema=SCHEMA)


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


# --- verdict tables ---------------------------------------------------------------------------
# A judge (rotserve.judge) writes one table per (judge, rubric) beside the rows, keyed to them by
# `row_key`. Separate tables, not columns: several judges sit beside one run, a judge can be
# added, rerun or deleted without touching the rows, and the grid never waits for a judge.

VERDICTS_DIR = "verdicts"
VERDICT_FORMAT = "rotserve-verdicts/2"  # 2: parsed, score, probs
VERDICT_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("row_key", pa.string(), nullable=False),
        pa.field("judge", pa.string(), nullable=False),
        pa.field("rubric", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=True),  # null when the rubric's rule decided
        pa.field("by_rule", pa.bool_(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        # the judge's prompt, in its tokens (0 when the rule decided); named apart from the
        # rows' prompt_tokens so a join keeps both
        pa.field("judge_prompt_tokens", pa.int32(), nullable=False),
        # the rest null when the rubric's rule decided: was the text an answer the rubric's
        # reading knows (false: its fallback label); P(the rubric's score label); P(each label)
        # from the judge's log-probs at the decision position (rotserve.judge.verdict)
        pa.field("parsed", pa.bool_(), nullable=True),
        pa.field("score", pa.float64(), nullable=True),
        pa.field("probs", pa.map_(pa.string(), pa.float64()), nullable=True),
    ],
    metadata={"rotserve.schema": VERDICT_FORMAT},
)


def row_key(run_id: str, key: Sequence[Any]) -> str:
    """The stable key of one row: a hash of the run id and the row's KEY_COLUMNS values.

    The run id is inside, so a key never matches a row of another run. Values are hashed as
    JSON (floats as Python prints them, null for a baseline angle), so the key is the same in
    every process and on every machine.
    """
    blob = json.dumps([run_id, *key], separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def row_keys(rows: pa.Table) -> list[str]:
    """`row_key` of every row of a rows table (its run_id and KEY_COLUMNS), in table order."""
    cols = [rows.column(k).to_pylist() for k in ("run_id", *KEY_COLUMNS)]
    return [row_key(r[0], r[1:]) for r in zip(*cols, strict=True)]


def verdicts_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / VERDICTS_DIR / name


def verdict_manifest_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / VERDICTS_DIR / f"{name}.json"


def verdict_tables(run_dir: str | Path) -> list[str]:
    """Names of the verdict tables of a run (those with a manifest), sorted."""
    root = Path(run_dir) / VERDICTS_DIR
    if not root.is_dir():
        return []
    return sorted(p.stem for p in root.glob("*.json") if (root / p.stem).is_dir())


def read_verdict_manifest(run_dir: str | Path, name: str) -> dict[str, Any] | None:
    path = verdict_manifest_path(run_dir, name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None


def read_verdicts(run_dir: str | Path, name: str, rows: pa.Table | None = None) -> pa.Table:
    """A verdict table of the run, checked to belong to it (RunDirError if not).

    Checked: the table's manifest and every verdict carry the run's id, and every row_key is a
    key of one of the run's rows (pass `rows` to reuse an already read rows table).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise RunDirError(f"{run_dir}: no {MANIFEST}; not a grid run directory")
    run_id = manifest.get("run_id")
    vm = read_verdict_manifest(run_dir, name)
    if vm is None:
        raise RunDirError(
            f"{verdict_manifest_path(run_dir, name)}: no such verdict table in {run_dir} "
            f"(tables: {', '.join(verdict_tables(run_dir)) or 'none'})"
        )
    if vm.get("run_id") != run_id:
        raise RunDirError(
            f"verdict table {name} was made for run {vm.get('run_id')}, but {run_dir} is run "
            f"{run_id}: verdicts cannot be attached to another run; judge this run instead"
        )
    if vm.get("format") != VERDICT_FORMAT:
        raise RunDirError(old_verdict_format(name, vm))
    files = part_files_in(verdicts_dir(run_dir, name))
    if not files:
        return VERDICT_SCHEMA.empty_table()
    table = pa.concat_tables(pq.read_table(f, schema=VERDICT_SCHEMA) for f in files)
    check_verdicts(table, rows if rows is not None else read_rows(run_dir), str(run_id), name)
    return table


def old_verdict_format(name: str, manifest: dict[str, Any]) -> str:
    """The message for a verdict table written in another format than this rotserve's."""
    return (
        f"verdict table {name} is format {manifest.get('format')}, this rotserve reads and "
        f"writes {VERDICT_FORMAT} (label probabilities, parsed): judge the run again with "
        "--overwrite (or another --name) to rewrite it"
    )


def check_verdicts(verdicts: pa.Table, rows: pa.Table, run_id: str, name: str = "") -> None:
    """RunDirError unless every verdict is of this run and keyed to one of its rows, once."""
    ids = set(verdicts.column("run_id").to_pylist())
    if ids - {run_id}:
        raise RunDirError(
            f"verdict table {name} holds verdicts of run(s) {sorted(ids - {run_id})}, not of run "
            f"{run_id}: verdicts cannot be attached to another run"
        )
    keys = verdicts.column("row_key").to_pylist()
    known = set(row_keys(rows))
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise RunDirError(
            f"verdict table {name}: {len(unknown)} verdict(s) name rows this run does not have "
            f"(e.g. row_key {unknown[0]}); the table was made for other rows"
        )
    if len(set(keys)) != len(keys):
        raise RunDirError(f"verdict table {name}: a row has more than one verdict")
