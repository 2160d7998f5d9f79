"""What a grid run returns: counts, where the table is, timings and throughput."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: Path
    rows_dir: Path
    manifest_path: Path
    state: str  # new | resume | overwrite (how the run directory was found)
    rows_total: int
    shards_total: int
    shards_skipped: int  # already on disk from an earlier attempt
    shards_written: int  # by this attempt
    rows_written: int
    wall_s: float
    generate_s: float  # engines started .. last part written
    rows_per_s: float | None  # rows_written / generate_s (engine startup included)
    steady_rows_per_s: float | None = None  # after the first part: engines up and generating
    engine_failures: int = 0
    timings: dict[str, float] = field(default_factory=dict)
