"""A capability table: its layout, Arrow schemas and readers. Pure pyarrow (no lm-eval, no vLLM),
so the report and notebooks read it without the eval extra.

    DIR/capability/<name>/manifest.json          what was asked, the settings, tasks, counts
    DIR/capability/<name>/answers/part-*.parquet  the engine's answer to every (request, setting)
    DIR/capability/<name>/items.parquet           which lm-eval request (task, doc, choice) each is
    DIR/capability/<name>/scores.parquet          lm-eval's metrics per (task, setting): THE table
    DIR/_tmp/capability-<name>/                   files being written and the writer's lock

DIR is a grid run directory (beside its rows/ and verdicts/), or for settings given on the
command line (`--model`) the directory `--out` names. `answers/` holds only complete part files
(one per shard, the unit of resume); `scores.parquet` is rewritten from all of them, by
lm-eval's own metric code, once every shard is on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rotserve.rundir import RunDirError, part_files_in

CAPABILITY_DIR = "capability"
CAPABILITY_FORMAT = "rotserve-capability/1"
ANSWERS_DIR = "answers"
ITEMS_FILE = "items.parquet"
SCORES_FILE = "scores.parquet"
TABLE_MANIFEST = "manifest.json"

# The steering setting of a row, named as the grid's rows name it (rotserve.rundir.SCHEMA):
# angle null = the unsteered baseline, never 0°.
SETTING_FIELDS = [
    pa.field("angle", pa.float64(), nullable=True),
    pa.field("adaptive", pa.bool_(), nullable=False),
    pa.field("plane", pa.string(), nullable=True),
    pa.field("window", pa.string(), nullable=True),
]
SETTING_COLUMNS = tuple(f.name for f in SETTING_FIELDS)

# One row per (engine request, setting): what the engine answered.
ANSWER_SCHEMA = pa.schema(
    [
        pa.field("capability_id", pa.string(), nullable=False),
        pa.field("request_key", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # loglikelihood | generate_until
        *SETTING_FIELDS,
        # loglikelihood: the continuation's summed log-prob (nats) and whether every
        # continuation token was the greedy choice; null for a generation
        pa.field("logprob", pa.float64(), nullable=True),
        pa.field("is_greedy", pa.bool_(), nullable=True),
        pa.field("generation", pa.string(), nullable=True),  # null for a loglikelihood
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        # continuation tokens scored (loglikelihood) or tokens generated
        pa.field("output_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=True),
    ],
    metadata={"rotserve.schema": CAPABILITY_FORMAT},
)

# One row per lm-eval request (Instance): which engine requests answer it.
ITEM_SCHEMA = pa.schema(
    [
        pa.field("capability_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("idx", pa.int32(), nullable=False),  # the request's index within its doc
        pa.field("request_type", pa.string(), nullable=False),  # lm-eval's output type
        pa.field("instance_key", pa.string(), nullable=False),
        # a rolling log-likelihood is one request per window, summed; the others one
        pa.field("request_keys", pa.list_(pa.string()), nullable=False),
    ],
    metadata={"rotserve.schema": CAPABILITY_FORMAT},
)

# One row per (task or group, metric, filter, setting): lm-eval's score at that setting.
SCORE_SCHEMA = pa.schema(
    [
        pa.field("capability_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=True),  # null: settings from the command line
        pa.field("model", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("is_group", pa.bool_(), nullable=False),  # a group's aggregate of its tasks
        pa.field("metric", pa.string(), nullable=False),
        pa.field("filter", pa.string(), nullable=False),  # lm-eval's filter name ("none")
        pa.field("value", pa.float64(), nullable=True),
        pa.field("stderr", pa.float64(), nullable=True),  # null where lm-eval gives none
        pa.field("higher_is_better", pa.bool_(), nullable=True),
        pa.field("n_samples", pa.int64(), nullable=True),  # documents scored
        *SETTING_FIELDS,
    ],
    metadata={"rotserve.schema": CAPABILITY_FORMAT},
)
SCORE_KEY = ("task", "metric", "filter", *SETTING_COLUMNS)  # unique within a table


def table_dir(root: str | Path, name: str) -> Path:
    return Path(root) / CAPABILITY_DIR / name


def capability_tables(root: str | Path) -> list[str]:
    """Names of the capability tables in a run directory (those with a manifest), sorted."""
    base = Path(root) / CAPABILITY_DIR
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / TABLE_MANIFEST).is_file())


def read_capability_manifest(root: str | Path, name: str) -> dict[str, Any] | None:
    path = table_dir(root, name) / TABLE_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None


def _complete_manifest(root: str | Path, name: str) -> dict[str, Any]:
    manifest = read_capability_manifest(root, name)
    if manifest is None:
        raise RunDirError(
            f"{table_dir(root, name)}: no such capability table in {root} (tables: "
            f"{', '.join(capability_tables(root)) or 'none'}); run `rotserve capability` first"
        )
    if manifest.get("status") != "complete":
        raise RunDirError(
            f"capability table {name} in {root} is not complete (status "
            f"{manifest.get('status')!r}): rerun its command to finish it"
        )
    return manifest


def read_scores(root: str | Path, name: str) -> pa.Table:
    """A complete table's scores: one row per (task, metric, filter, setting)."""
    _complete_manifest(root, name)
    return pq.read_table(table_dir(root, name) / SCORES_FILE, schema=SCORE_SCHEMA)


def read_answers(root: str | Path, name: str) -> pa.Table:
    """Every answer of a complete table: one row per (engine request, setting)."""
    _complete_manifest(root, name)
    files = part_files_in(table_dir(root, name) / ANSWERS_DIR)
    if not files:
        return ANSWER_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=ANSWER_SCHEMA) for f in files)


def read_items(root: str | Path, name: str) -> pa.Table:
    """Which lm-eval request (task, doc, index) each answer's request_key belongs to."""
    _complete_manifest(root, name)
    return pq.read_table(table_dir(root, name) / ITEMS_FILE, schema=ITEM_SCHEMA)
