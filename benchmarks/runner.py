"""Run the selected benchmark sections in one process and write the JSON and BENCHMARKS.md.

The sections themselves are benchmarks/sections/<name>.py; this module starts and stops the
engines they share, runs them in order and assembles the headline numbers and targets.

Order: the rotation op and the extraction first (no engine alive to disturb them), then both
vLLM engines, kept alive together so that their contenders alternate round by round, then the
grid: rotserve's one mixed-angle pass against the reference method's two ways of producing a
grid (HF generate with hooks, and a stock eager vLLM engine with hooks, one angle per call),
in the same alternation.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.machine import device_label, loadavg, machine, versions
from benchmarks.models import ModelShape, model_dir, plane_file
from benchmarks.sections import (
    capability,
    coherence,
    distinct,
    extract,
    grid,
    judge,
    rotation,
    steer,
)
from benchmarks.sections.common import Context
from benchmarks.settings import BenchSettings
from benchmarks.timing import finite_positive

TARGETS: dict[str, tuple[str, float]] = {
    "steer_overhead_ratio": (">=", 0.95),
    "grid_speedup": (">=", 10.0),
    "distinct_angles_ratio": (">=", 0.98),
    "rotation_vs_copy": ("<=", 2.0),
    "canary_s": ("<=", 2.0),
    "judge_ratio": (">=", 0.8),
}
TOP_LEVEL = (
    "steer_overhead_ratio",
    "grid_speedup",
    "grid_vs_vllm_hooks",
    "distinct_angles_ratio",
    "rotation_vs_copy",
    "extract_prompts_per_s",
    "coherence_throughput_ratio",
    "canary_s",
    "judge_ratio",
    "device",
)


def _children_cpu() -> dict[int, float]:
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _engine_processes() -> list[dict[str, Any]]:
    """Name, CPU affinity and thread count of every engine process (the binding vLLM chose)."""
    import psutil

    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            procs.append(
                {"name": p.name(), "cpu_affinity": p.cpu_affinity(), "threads": p.num_threads()}
            )
        except psutil.Error:
            pass
    return procs


def _start_engines(ctx: Context, shape: ModelShape, stock: bool) -> dict[str, Any]:
    from benchmarks.engines import BenchEngine

    s = ctx.settings
    model = model_dir(shape, ctx.models_root)
    plane = plane_file(shape, ctx.models_root)
    engines: dict[str, Any] = {}
    starts: dict[str, float] = {}
    for name, p in (("stock", None), ("rotserve", plane)) if stock else (("rotserve", plane),):
        ctx.log(f"starting {name} engine on {shape.name}")
        t0 = time.perf_counter()
        engines[name] = BenchEngine(model, p, s.dtype, s.max_model_len, s.enforce_eager)
        starts[name] = round(time.perf_counter() - t0, 1)
        ctx.log(f"  started in {starts[name]} s")
    # Engines that are alive but idle must not steal cycles from the one being timed. vLLM's
    # worker spins for 1 s after its last request, so measure after a settle pause (the
    # same pause alternate() takes before every timed call).
    time.sleep(s.settle_s)
    before = _children_cpu()
    time.sleep(s.idle_probe_s)
    after = _children_cpu()
    idle = sum(after.get(pid, 0.0) - t for pid, t in before.items()) / s.idle_probe_s * 100
    ctx.details.setdefault("engines", {}).update(
        {
            "alive_together": list(engines),
            "start_s": starts,
            "idle_cpu_percent": idle,
            "processes": _engine_processes(),
            "binding": "VLLM_CPU_OMP_THREADS_BIND="
            + os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
            + ", VLLM_CPU_NUM_OF_RESERVED_CPU="
            + os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "(vLLM default: 1 on this machine)"),
        }
    )
    return engines


def _targets(doc: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, (op, bound) in TARGETS.items():
        v = doc.get(key)
        ok = None
        if isinstance(v, float) and math.isfinite(v):
            ok = v >= bound if op == ">=" else v <= bound
        out[key] = {"target": f"{op} {bound:g}", "value": v, "met": ok}
    return out


def run_bench(
    settings: BenchSettings,
    out_dir: Path,
    markdown: Path | None,
    models_root: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the selected sections, write out_dir/bench.json (+ markdown), return the JSON."""
    from benchmarks.engines import set_engine_env
    from benchmarks.report import render_markdown, write_markdown
    from rotserve.extract import display_path

    t_start = time.perf_counter()
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    out_dir.mkdir(parents=True, exist_ok=True)
    root = models_root or out_dir / "models"
    root.mkdir(parents=True, exist_ok=True)

    def _log(msg: str) -> None:
        line = f"[bench {time.perf_counter() - t_start:6.1f}s] {msg}"
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(line)

    set_engine_env(settings.kv_cache_gib)
    ctx = Context(settings, root, _log)
    ctx.load["start"] = loadavg()
    mach = machine()
    sections = set(settings.sections)
    _log(f"{device_label(mach)}; load average {ctx.load['start']}")
    if sections - {"judge", "capability"}:  # the judge section runs the shipped toy judge
        for shape in {settings.model, settings.grid_model}:
            model_dir(shape, root)  # build once, before anything is timed

    if "rotation" in sections:
        rotation.run(ctx)
    if "extract" in sections:
        extract.run(ctx, out_dir)
    ctx.load["before_engines"] = loadavg()
    engines: dict[str, Any] = {}
    try:
        if sections & {"steer", "distinct", "coherence"}:
            engines = _start_engines(ctx, settings.model, stock="steer" in sections)
            if "steer" in sections:
                steer.run(ctx, engines)
            if "distinct" in sections:
                distinct.run(ctx, engines)
            if "coherence" in sections:
                coherence.run(ctx, engines)
        if "judge" in sections:
            judge.run(ctx)
        if "grid" in sections:
            if settings.grid_model != settings.model or "rotserve" not in engines:
                for e in engines.values():
                    e.close()
                engines = _start_engines(ctx, settings.grid_model, stock=False)
            elif "stock" in engines:
                engines.pop("stock").close()  # the grid needs one engine; free its core
            grid.run(ctx, engines)
    finally:
        for e in engines.values():
            e.close()
    if "capability" in sections and settings.capability_angles:  # its own engine and server
        capability.run(ctx)
    ctx.load["end"] = loadavg()

    d = ctx.details
    doc: dict[str, Any] = {
        "steer_overhead_ratio": d.get("steer_overhead", {}).get("ratio"),
        "grid_speedup": d.get("grid", {}).get("speedup"),
        "grid_vs_vllm_hooks": (d.get("grid", {}).get("vs_vllm_hooks_headline") or {}).get("ratio"),
        "distinct_angles_ratio": d.get("distinct_angles", {}).get("ratio"),
        "rotation_vs_copy": d.get("rotation_op", {}).get("rotation_vs_copy"),
        "extract_prompts_per_s": d.get("extract", {}).get("prompts_per_s"),
        "coherence_throughput_ratio": d.get("coherence", {}).get("ratio"),
        "canary_s": d.get("coherence", {}).get("canary_s"),
        "judge_ratio": d.get("judge", {}).get("ratio"),
        "device": device_label(mach),
    }
    if "capability" in d:  # not a TOP_LEVEL key: the test suite's tiny run leaves it out
        doc["capability_ratio"] = d["capability"]["ratio"]
    doc.update(
        {
            "rotation_vs_copy_any_form": d.get("rotation_op", {}).get("any_form_vs_copy"),
            "extract_peak_rss_bytes": d.get("extract", {}).get("peak_rss_bytes"),
            "started": started,
            "wall_s": time.perf_counter() - t_start,
            "machine": mach,
            "versions": versions(),
            "load": ctx.load,
            "settings": settings.as_dict(),
            "models": {
                "model": settings.model.as_dict(),
                **(
                    {"grid_model": settings.grid_model.as_dict()}
                    if settings.grid_model != settings.model
                    else {}
                ),
            },
            "json_path": display_path(out_dir / "bench.json"),
            "details": d,
        }
    )
    doc["targets"] = _targets(doc)
    (out_dir / "bench.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    (out_dir / "bench.md").write_text(render_markdown(doc), encoding="utf-8")
    if markdown is not None:
        write_markdown(doc, markdown)
    _log(
        "done: "
        + ", ".join(
            f"{k} {doc[k]:.3g}" if finite_positive(doc[k]) else f"{k} {doc[k]}"
            for k in TOP_LEVEL[:-1]
        )
    )
    return doc
