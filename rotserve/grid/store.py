"""The grid's side of the run directory: open it (new, resume or refuse), lock it, publish parts.

The layout, the schema and the readers are the contract in rotserve.rundir; this module is the
one writer. Exactly-once on disk: a shard's rows are published as `rows/part-<shard id>.parquet`
by rundir.atomic_write, so a part file either does not exist or holds that shard's complete
rows. Writing the same shard twice replaces a file with an equivalent one: it can never add rows.

PartStore is that machinery for any table of parts (one writer, atomic parts, resume by
counting rows per part); RunStore is the grid's rows, and the judge's verdict tables
(rotserve.judge.store) are another PartStore.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from rotserve.grid.manifest import now
from rotserve.rundir import (
    MANIFEST,
    REPORT_DIR,
    ROWS_DIR,
    SCHEMA,
    TMP_DIR,
    VERDICTS_DIR,
    RunDirError,
    atomic_write,
    part_files_in,
    part_name,
    read_manifest,
    shard_of_part,
)


class PartStore:
    """A folder of part files (`parts_dir`) with a manifest, written by one driver at a time.

    Subclasses say where the parts, the manifest and the temporary files live, which schema
    the parts have and what the writer is called in messages.
    """

    schema: ClassVar[pa.Schema]
    writer: ClassVar[str]  # "grid job", "judge job": who holds the lock, in messages
    _lock_fd: int | None

    @property
    def parts_dir(self) -> Path:
        raise NotImplementedError

    @property
    def manifest_path(self) -> Path:
        raise NotImplementedError

    @property
    def tmp_dir(self) -> Path:
        raise NotImplementedError

    @property
    def location(self) -> str:
        """How messages name this store (e.g. `--out DIR`)."""
        return str(self.parts_dir)

    def _prepare(self) -> None:
        """Create the folders, take the lock, delete a killed writer's orphans."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        # Orphans of a killed writer: incomplete by construction, never data.
        for orphan in self.tmp_dir.glob("*.tmp"):
            orphan.unlink(missing_ok=True)

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.tmp_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"{self.location} is being written by another {self.writer} right now; wait "
                "for it or choose another --out"
            ) from None
        self._lock_fd = fd  # released by close() or, if the job is killed, by the kernel

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- parts --------------------------------------------------------------------------------

    def finished_shards(self, plan: Any) -> set[str]:
        """Shard ids whose part file is present and holds the expected number of rows.

        `plan.shards` are the planned shards (each with shard_id and n_rows). A part that
        cannot be read or has the wrong count cannot come from this code (writes are atomic)
        but could from a damaged disk: it is deleted and its shard redone. A part file that no
        shard of the plan names is refused: readers would count its rows.
        """
        expected = {s.shard_id: s.n_rows for s in plan.shards}
        done: set[str] = set()
        for path in sorted(self.parts_dir.iterdir()):
            sid = shard_of_part(path.name)
            if sid not in expected:
                raise RunDirError(
                    f"{path}: not a part file of this run's plan; {self.parts_dir} must hold "
                    "only this run's parts (readers read the whole directory). Move it away"
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
        """Atomically publish a shard's table as <parts_dir>/part-<shard id>.parquet."""
        if table.schema != self.schema:
            table = table.cast(self.schema)
        final = self.parts_dir / part_name(shard_id)
        return atomic_write(
            final, lambda f: pq.write_table(table, f, compression="zstd"), self.tmp_dir
        )

    def rows_written(self) -> int:
        return sum(pq.read_metadata(p).num_rows for p in part_files_in(self.parts_dir))

    # -- manifest -----------------------------------------------------------------------------

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "updated": now()}
        text = json.dumps(manifest, indent=2) + "\n"
        atomic_write(self.manifest_path, lambda f: f.write(text.encode()), self.tmp_dir)


@dataclass
class RunStore(PartStore):
    """One run directory, opened for writing by one driver at a time (an flock on _tmp/lock)."""

    schema: ClassVar[pa.Schema] = SCHEMA
    writer: ClassVar[str] = "grid job"
    root: Path
    run_id: str
    _lock_fd: int | None = None

    @property
    def rows_dir(self) -> Path:
        return self.root / ROWS_DIR

    @property
    def parts_dir(self) -> Path:
        return self.rows_dir

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_DIR

    @property
    def location(self) -> str:
        return f"--out {self.root}"

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
            # Verdicts go too: they judged the rows being replaced.
            for name in (ROWS_DIR, TMP_DIR, REPORT_DIR, VERDICTS_DIR):
                shutil.rmtree(root / name, ignore_errors=True)
            (root / MANIFEST).unlink(missing_ok=True)
        store = cls(root=root, run_id=run_id)
        store._prepare()
        return store, state

    def read_manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.root)
