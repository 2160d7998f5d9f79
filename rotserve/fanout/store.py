"""A folder of Parquet parts written by one driver: a lock, atomic parts, resume by row counts.

Exactly-once on disk: a shard's table is published as `part-<shard id>.parquet` by
rundir.atomic_write, so a part file either does not exist or holds that shard's complete table.
Writing the same shard twice replaces a file with an equivalent one: it can never add rows.
Each job says where its parts, manifest and temporary files live (the grid's rows, a judge's
verdict table) by subclassing PartStore.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from rotserve.fanout.provenance import now
from rotserve.rundir import RunDirError, atomic_write, part_files_in, part_name, shard_of_part


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
