"""The manifest a grid run writes: what was asked, what it resolved to, what ran it.

A reader (the report, a notebook, a later resume) learns from it how the rows were made
without the command line: every input's hash, the plan's counts, the package versions and
one entry per attempt (new, resume) with its timings and engine failures.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rotserve.fanout import now, provenance
from rotserve.grid.config import ResolvedGrid, config_dict
from rotserve.grid.plan import GridPlan
from rotserve.rundir import FORMAT, REPORT_DIR, ROWS_DIR, SCHEMA


def build_manifest(
    resolved: ResolvedGrid,
    plan: GridPlan,
    root: Path,
    previous: dict[str, Any] | None,
    argv: list[str] | None,
) -> dict[str, Any]:
    """The manifest of this attempt; `previous` (the one on disk) keeps created and attempts."""
    c = resolved.config
    previous = previous or {}
    return {
        "format": FORMAT,
        "run_id": resolved.run_id,
        "status": "running",
        "created": previous.get("created", now()),
        "command": argv,  # of the latest attempt
        "config": config_dict(c),
        "resolved": {
            "model": resolved.model,
            "model_is_local": resolved.model_is_local,
            "revision": c.revision,
            "hidden_size": resolved.hidden_size,
            "angles": list(resolved.angles),
            "masks": ["adaptive" if m else "plain" for m in c.adaptive_masks],
            "baseline": c.baseline,
            "out": str(root),
        },
        "identity": resolved.identity(),
        "plane": {
            "path": str(resolved.plane_path),
            "sha256": resolved.plane_sha256,
            "plane_id": resolved.plane.plane_id,
            "hidden_size": resolved.plane.hidden_size,
            "meta": asdict(resolved.plane.meta),
        },
        # Every plane of the run (one for a single-plane run), in the engine's slot order.
        "planes": [
            {"name": name, "path": str(path), "sha256": sha, "plane_id": plane.plane_id}
            for (name, path), (_, sha), plane in zip(
                resolved.steering.settings.planes,
                resolved.plane_shas,
                resolved.steering.planes,
                strict=True,
            )
        ],
        "windows": list(resolved.windows),
        "selective_layers": dict(resolved.selective),
        "prompts": [
            {"label": s.label, "path": str(s.path), "sha256": s.sha256, "n": len(s.prompts)}
            for s in resolved.prompt_sets
        ],
        "plan": {
            "fingerprint": plan.fingerprint,
            "conditions": len(plan.conditions),
            "units": plan.n_units,
            "samples_per_prompt": plan.samples,
            "shard_size": c.shard_size,
            "shards": len(plan.shards),
        },
        "rows": {"expected": plan.n_rows, "written": None},
        "layout": {"rows": f"{ROWS_DIR}/part-NNNNN.parquet (one per shard)", "report": REPORT_DIR},
        "schema": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in SCHEMA],
        **provenance(),
        "attempts": list(previous.get("attempts", [])),
    }
