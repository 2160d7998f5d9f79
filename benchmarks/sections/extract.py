"""Plane extraction: prompts per second and peak memory, one child process per dtype."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.child import child_env
from benchmarks.models import model_dir
from benchmarks.sections.common import Context


def _extract_once(ctx: Context, out_dir: Path, dtype: str) -> dict[str, Any]:
    s = ctx.settings
    model = model_dir(s.model, ctx.models_root)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.extract_child",
            str(model),
            tmp,
            "--batch-size",
            str(s.extract_batch_size),
            "--dtype",
            dtype,
        ]
        if s.extract_limit is not None:
            cmd += ["--limit", str(s.extract_limit)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROTSERVE_EXTRACT_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"extraction child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    res = json.loads(lines[-1].split(" ", 1)[1])
    res["model"] = s.model.name
    ctx.log(
        f"  {dtype}: {res['prompts']} prompts in {res['extract_s']:.1f} s = "
        f"{res['prompts_per_s']:.2f} prompts/s, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    return res


def run(ctx: Context, out_dir: Path) -> None:
    """One child process per dtype, so each peak RSS is that extraction's own."""
    ctx.log(f"extraction on {ctx.settings.model.name} (child process per dtype)")
    runs = [_extract_once(ctx, out_dir, dtype) for dtype in ctx.settings.extract_dtypes]
    ctx.details["extract"] = {**runs[0], "by_dtype": runs}
