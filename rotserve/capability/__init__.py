"""Capability: lm-evaluation-harness tasks at every steering setting, in one mixed batch.

    result = run_capability(CapabilityConfig(tasks=("toy_reply_mc",), run_dir="runs/grid-<id>"))
    scores = read_scores(result.root, result.name)   # task, metric, value, stderr, setting

table.py is the table (layout, schemas, readers; no lm-eval); tasks.py is lm-eval's side
(loading, recording requests, scoring); plan.py cuts requests x settings into shards; engine.py
is the worker; store.py the part store; config.py resolves a request; job.py chains them on
rotserve.fanout. lm-eval itself is the optional extra `rotserve[eval]`.
"""

from rotserve.capability.config import CapabilityConfig, CapabilityConfigError
from rotserve.capability.job import CapabilityResult, run_capability
from rotserve.capability.table import (
    ANSWER_SCHEMA,
    SCORE_SCHEMA,
    capability_tables,
    read_answers,
    read_capability_manifest,
    read_items,
    read_scores,
)

__all__ = [
    "ANSWER_SCHEMA",
    "SCORE_SCHEMA",
    "CapabilityConfig",
    "CapabilityConfigError",
    "CapabilityResult",
    "capability_tables",
    "read_answers",
    "read_capability_manifest",
    "read_items",
    "read_scores",
    "run_capability",
]
