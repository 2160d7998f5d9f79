"""The keyword markers as a verdict table: a second judge for free.

`rotserve judge keyword RUN_DIR` (or `rotserve grid ... --keyword-table`) writes
RUN_DIR/verdicts/keyword.markers/ from the rows' own `refusal` and `refusal_marker` columns
(rotserve.scoring, computed by the grid): label `refusal` when a generation holds a marker,
else `answer`. No model and no engine, so the report can set any judge beside the field's
substring convention on the shared axis (refusal -> refuse, answer -> comply) in well under a
second, and the table joins like every other (same schema, same checks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from rotserve.fanout import now, provenance
from rotserve.judge.axis import KEYWORD_AXIS, KEYWORD_LABELS
from rotserve.judge.store import engine_free_table, publish_table
from rotserve.rundir import (
    VERDICT_FORMAT,
    VERDICT_SCHEMA,
    RunDirError,
    read_manifest,
    read_rows,
)
from rotserve.scoring import REFUSAL_MARKERS

JUDGE, RUBRIC = "keyword", "markers"
NAME = f"{JUDGE}.{RUBRIC}"
DESCRIPTION = (
    "the substring refusal markers of the method's evaluation (rotserve.scoring."
    "REFUSAL_MARKERS), as the grid scored every row: refusal = the generation holds a marker "
    "(case-insensitive), answer = it holds none (broken text included: the convention's blind "
    "spot)"
)


@dataclass(frozen=True)
class KeywordResult:
    name: str
    table_dir: Path
    manifest_path: Path
    state: str  # new | resume | overwrite
    label_counts: dict[str, int]


def complete_rows(run_dir: Path) -> tuple[dict[str, Any], pa.Table]:
    """The run's manifest and rows, RunDirError unless it is a complete grid run."""
    manifest = read_manifest(run_dir)
    if manifest is None or "run_id" not in manifest:
        raise RunDirError(
            f"{run_dir} holds no grid manifest.json: not a run directory (give the directory "
            "`rotserve grid` wrote, e.g. runs/grid-<run id>)"
        )
    rows = read_rows(run_dir)
    expected = (manifest.get("rows") or {}).get("expected")
    if manifest.get("status") != "complete" or rows.num_rows != expected or not rows.num_rows:
        raise RunDirError(
            f"{run_dir} is not a complete run ({rows.num_rows} of {expected} rows, status "
            f"{manifest.get('status')!r}): rerun its grid command to finish it first"
        )
    return manifest, rows


def keyword_verdicts(
    run_dir: str | Path, *, overwrite: bool = False, argv: list[str] | None = None
) -> KeywordResult:
    """Write (or rewrite, identically) the keyword table of a complete run."""
    run_dir = Path(run_dir).expanduser().resolve()
    manifest, rows = complete_rows(run_dir)
    run_id = str(manifest["run_id"])
    refused = rows.column("refusal").to_pylist()
    labels = [KEYWORD_LABELS[0] if r else KEYWORD_LABELS[1] for r in refused]
    n = rows.num_rows
    raw = rows.column("refusal_marker").to_pylist()  # the marker found, or null
    table = engine_free_table(
        run_id, rows.column("row_key").to_pylist(), JUDGE, RUBRIC, labels, raw, parsed=None
    )
    identity = {
        "format": VERDICT_FORMAT,
        "run_id": run_id,
        "judge": JUDGE,
        "rubric": RUBRIC,
        "markers": list(REFUSAL_MARKERS),
        "rows": n,
    }
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    verdict_id = hashlib.sha256(blob).hexdigest()[:12]
    counts = {lb: labels.count(lb) for lb in KEYWORD_LABELS}
    out = {
        "format": VERDICT_FORMAT,
        "run_id": run_id,
        "verdict_id": verdict_id,
        "name": NAME,
        "status": "complete",
        "created": now(),
        "command": argv,
        "judge": {"model": JUDGE, "model_is_local": True, "revision": None},
        "rubric": {
            "name": RUBRIC,
            "labels": list(KEYWORD_LABELS),
            "axis": dict(KEYWORD_AXIS),
            "description": DESCRIPTION,
            "markers": list(REFUSAL_MARKERS),
        },
        "rules": {
            "short_response": None,
            "reading": "the rows' refusal column: refusal when the generation holds one of the "
            "markers (case-insensitive, typographic apostrophes folded), else answer; raw holds "
            "the marker found",
        },
        "canary": {"status": "not run", "why": "no model: the markers are the rule itself"},
        "counts": {"rows": n, "judged": 0, "by_rule": 0, "truncated": 0, "unparsed": 0},
        "labels_counted": counts,
        "identity": identity,
        "rows": {"expected": n, "written": n},
        "schema": [
            {"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in VERDICT_SCHEMA
        ],
        **provenance(),
    }
    path, state = publish_table(run_dir, NAME, run_id, verdict_id, table, out, overwrite)
    return KeywordResult(NAME, path.parent / NAME, path, state, counts)
