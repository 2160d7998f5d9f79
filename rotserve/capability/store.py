"""A capability table's store: DIR/capability/<name>/answers/ (one part per shard), its manifest
and the two files derived from the run (items.parquet, scores.parquet).

The fan-out's part machinery (rotserve.fanout.PartStore: one writer at a time, atomic parts,
resume by counting each part's rows) on its own folder, with its own temporary folder and lock
(DIR/_tmp/capability-<name>/), so it never touches a grid's rows or a judge's verdicts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from rotserve.capability.table import (
    ANSWER_SCHEMA,
    ANSWERS_DIR,
    TABLE_MANIFEST,
    read_capability_manifest,
    table_dir,
)
from rotserve.fanout import PartStore
from rotserve.rundir import TMP_DIR, RunDirError, atomic_write, part_files_in


@dataclass
class CapabilityStore(PartStore):
    schema: ClassVar[pa.Schema] = ANSWER_SCHEMA
    writer: ClassVar[str] = "capability job"
    root: Path
    name: str
    _lock_fd: int | None = None

    @property
    def table_dir(self) -> Path:
        return table_dir(self.root, self.name)

    @property
    def parts_dir(self) -> Path:
        return self.table_dir / ANSWERS_DIR

    @property
    def manifest_path(self) -> Path:
        return self.table_dir / TABLE_MANIFEST

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_DIR / f"capability-{self.name}"

    @property
    def location(self) -> str:
        return f"capability table {self.table_dir}"

    def read_manifest(self) -> dict[str, Any] | None:
        return read_capability_manifest(self.root, self.name)

    def write_file(self, filename: str, table: pa.Table) -> Path:
        """Atomically publish a whole-table file (items, scores) beside answers/."""
        return atomic_write(
            self.table_dir / filename,
            lambda f: pq.write_table(table, f, compression="zstd"),
            self.tmp_dir,
        )

    @staticmethod
    def check(root: Path, name: str, capability_id: str, overwrite: bool) -> str:
        """'new', 'resume' or 'overwrite' for this request's table, else RunDirError."""
        manifest = read_capability_manifest(root, name)
        parts = part_files_in(table_dir(root, name) / ANSWERS_DIR)
        if manifest is None:
            if not parts:
                return "new"
            if overwrite:
                return "overwrite"
            raise RunDirError(
                f"{table_dir(root, name)} holds answer parts but no manifest: not a capability "
                "table of rotserve; move it away or pass --overwrite"
            )
        if manifest.get("capability_id") == capability_id:
            return "resume"
        if overwrite:
            return "overwrite"
        raise RunDirError(
            f"capability table {name} in {root} exists with other settings (capability id "
            f"{manifest.get('capability_id')}, this request {capability_id}: tasks, limit, "
            "settings, model or dtype differ); give another --name, or --overwrite to replace it"
        )

    @classmethod
    def open(
        cls, root: Path, name: str, capability_id: str, overwrite: bool
    ) -> tuple[CapabilityStore, str]:
        state = cls.check(root, name, capability_id, overwrite)
        store = cls(root=root, name=name)
        if state == "overwrite":
            shutil.rmtree(store.table_dir, ignore_errors=True)
        store._prepare()
        return store, state
