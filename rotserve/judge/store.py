"""A verdict table of a run: RUN_DIR/verdicts/<name>/part-*.parquet and <name>.json beside it.

The fan-out's part machinery (rotserve.fanout.PartStore: one writer at a time, atomic parts,
resume by counting each part's rows) on another folder, with its own temporary folder and lock
(RUN_DIR/_tmp/verdicts-<name>/), so a judge never touches the grid's files and two judges of
one run never touch each other's.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from rotserve.fanout import PartStore
from rotserve.rundir import (
    TMP_DIR,
    VERDICT_FORMAT,
    VERDICT_SCHEMA,
    RunDirError,
    old_verdict_format,
    part_files_in,
    read_verdict_manifest,
    verdict_manifest_path,
    verdicts_dir,
)


@dataclass
class VerdictStore(PartStore):
    schema: ClassVar[pa.Schema] = VERDICT_SCHEMA
    writer: ClassVar[str] = "judge job"
    run_dir: Path
    name: str
    _lock_fd: int | None = None

    @property
    def parts_dir(self) -> Path:
        return verdicts_dir(self.run_dir, self.name)

    @property
    def manifest_path(self) -> Path:
        return verdict_manifest_path(self.run_dir, self.name)

    @property
    def tmp_dir(self) -> Path:
        return self.run_dir / TMP_DIR / f"verdicts-{self.name}"

    @property
    def location(self) -> str:
        return f"verdict table {self.parts_dir}"

    def read_manifest(self) -> dict[str, Any] | None:
        return read_verdict_manifest(self.run_dir, self.name)

    @staticmethod
    def check(run_dir: Path, name: str, run_id: str, verdict_id: str, overwrite: bool) -> str:
        """'new', 'resume' or 'overwrite' for this request's table, else RunDirError."""
        manifest = read_verdict_manifest(run_dir, name)
        parts = part_files_in(verdicts_dir(run_dir, name))
        if manifest is None:
            if not parts:
                return "new"
            if overwrite:
                return "overwrite"
            raise RunDirError(
                f"{verdicts_dir(run_dir, name)} holds part files but no manifest: not a "
                "verdict table of rotserve; move it away or pass --overwrite"
            )
        if manifest.get("verdict_id") == verdict_id and manifest.get("run_id") == run_id:
            return "resume"
        if overwrite:
            return "overwrite"
        if manifest.get("format") != VERDICT_FORMAT:
            raise RunDirError(old_verdict_format(name, manifest))
        if manifest.get("run_id") != run_id:
            raise RunDirError(
                f"verdict table {name} in {run_dir} was made for run {manifest.get('run_id')}, "
                f"not for this run ({run_id}): verdicts cannot be attached to another run. "
                "Pass --overwrite to judge this run into it"
            )
        raise RunDirError(
            f"verdict table {name} exists with other settings (verdict id "
            f"{manifest.get('verdict_id')}, this request {verdict_id}: judge, rubric, dtype or "
            "context differ); give another --name, or --overwrite to replace it"
        )

    @classmethod
    def open(
        cls, run_dir: Path, name: str, run_id: str, verdict_id: str, overwrite: bool
    ) -> tuple[VerdictStore, str]:
        state = cls.check(run_dir, name, run_id, verdict_id, overwrite)
        store = cls(run_dir=run_dir, name=name)
        if state == "overwrite":
            shutil.rmtree(store.parts_dir, ignore_errors=True)
            store.manifest_path.unlink(missing_ok=True)
        store._prepare()
        return store, state


def engine_free_table(
    run_id: str,
    keys: list[str],
    judge: str,
    rubric: str,
    labels: list[str],
    raw: list[str | None],
    parsed: bool | None,
) -> pa.Table:
    """A verdict table no judge model wrote (keyword markers, a human audit): labels and the
    raw text they came from, no prompt, no truncation, no probabilities."""
    n = len(keys)
    return pa.table(
        {
            "run_id": [run_id] * n,
            "row_key": keys,
            "judge": [judge] * n,
            "rubric": [rubric] * n,
            "label": labels,
            "raw": raw,
            "by_rule": [False] * n,
            "truncated": [False] * n,
            "judge_prompt_tokens": [0] * n,
            "parsed": [parsed] * n,
            "score": [None] * n,
            "probs": [None] * n,
        },
        schema=VERDICT_SCHEMA,
    )


def publish_table(
    run_dir: Path,
    name: str,
    run_id: str,
    verdict_id: str,
    table: pa.Table,
    manifest: dict[str, Any],
    overwrite: bool,
) -> tuple[Path, str]:
    """A verdict table made without a judge engine (the keyword markers, a human audit), written
    as one part with its manifest, under the same lock and refusals as a judge's table (the same
    verdict id finds it and writes it again: 'resume'). Returns (manifest path, state)."""
    store, state = VerdictStore.open(run_dir, name, run_id, verdict_id, overwrite)
    try:
        store.write_part("00000", table)  # atomic: replaces the same table's one part
        store.write_manifest(manifest)
        return store.manifest_path, state
    finally:
        store.close()
