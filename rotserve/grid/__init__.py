"""The grid: every prompt at every angle, fanned out over vLLM engines on Ray, to Parquet.

    result = run_grid(GridConfig(angles=evenly_spaced(72)))   # -> RunResult
    rows = rotserve.rundir.read_rows(result.run_dir)

The stages live in files named after them (job.py reads as the chain) and run on
rotserve.fanout; the run directory it writes is the contract in rotserve.rundir.
"""

from rotserve.grid.config import GridConfig, GridConfigError, evenly_spaced, parse_angle_list
from rotserve.grid.job import run_grid
from rotserve.grid.result import RunResult
from rotserve.grid.rows import GridEngine, GridRunError
from rotserve.rundir import SCHEMA, RunDirError, read_rows

__all__ = [
    "SCHEMA",
    "GridConfig",
    "GridConfigError",
    "GridEngine",
    "GridRunError",
    "RunDirError",
    "RunResult",
    "evenly_spaced",
    "parse_angle_list",
    "read_rows",
    "run_grid",
]
