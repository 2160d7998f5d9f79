"""Run every benchmark in one process and write the JSON and BENCHMARKS.md.

Order: the rotation op and the extraction first (no engine alive to disturb them), then both
vLLM engines, kept alive together so that their contenders alternate round by round, then the
HF reference grid against rotserve's grid in the same alternation.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rotserve.bench.machine import device_label, loadavg, machine, versions
from rotserve.bench.models import QWEN25_05B, TINY, ModelShape, model_dir, plane_file
from rotserve.bench.timing import Rounds, alternate, finite_positive

TARGETS: dict[str, tuple[str, float]] = {
    "steer_overhead_ratio": (">=", 0.95),
    "grid_speedup": (">=", 10.0),
    "distinct_angles_ratio": (">=", 0.98),
    "rotation_vs_copy": ("<=", 2.0),
}
# A round during which other processes used more than this many cores is run again.
MAX_EXTERNAL_CORES = 0.3
TOP_LEVEL = (
    "steer_overhead_ratio",
    "grid_speedup",
    "distinct_angles_ratio",
    "rotation_vs_copy",
    "extract_prompts_per_s",
    "device",
)


@dataclass
class BenchSettings:
    """Sizes of every benchmark. `full()` is the default run (~14 min on 2 cores),
    `quick_settings()` (--quick) takes ~4 min once vLLM's compile cache is warm, `tiny()` is
    the test suite's smoke run."""

    quick: bool = False
    model: ModelShape = QWEN25_05B
    grid_model: ModelShape = QWEN25_05B
    dtype: str = "bfloat16"  # what vLLM picks for a float32 checkpoint on CPU ("auto")
    enforce_eager: bool = False
    max_model_len: int = 512
    kv_cache_gib: int = 1
    warmup: int = 1
    # Pause before each timed engine call (see timing.alternate): > vLLM's 1 s busy-poll window.
    settle_s: float = 1.5
    idle_probe_s: float = 2.0  # how long idle engines are watched for stray CPU use
    steer_requests: int = 64
    steer_tokens: int = 64
    steer_rounds: int = 7
    distinct_requests: int = 72
    distinct_tokens: int = 48
    distinct_rounds: int = 7
    shared_angle: float = 30.0
    grid_angles: int = 36
    # One grid per prompt count; the headline is the largest (HF batches best there).
    grid_prompts: tuple[int, ...] = (1, 8)
    grid_tokens: int = 32
    grid_rounds: int = 2
    hf_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    hf_batch_sizes: tuple[int, ...] = (1, 4, 8)
    roofline_seconds: float = 1.0  # per row count of the matmul-peak probe
    # The first shape is the headline: vLLM's CPU prefill chunk (max_num_batched_tokens 4096),
    # which fits this CPU's 32 MiB L3; 32768 tokens does not (DRAM-bound); 64 is a decode step.
    rotation_shapes: tuple[tuple[int, int], ...] = ((4096, 896), (32768, 896), (64, 896))
    rotation_rounds: int = 11
    rotation_compile: bool = True
    # Token counts for the in-graph cost per steered site (decode-sized, prefill-chunk-sized).
    rotation_in_graph_tokens: tuple[int, ...] = (64, 4096)
    rotation_in_graph_sites: int = 8
    extract_limit: int | None = None  # per class; None = every prompt in data/prompts
    extract_batch_size: int = 16
    # The first is the headline (the CLI default, float32); bfloat16 shows what AVX512-BF16 buys.
    extract_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    sections: tuple[str, ...] = ("rotation", "extract", "steer", "distinct", "grid")

    @classmethod
    def full(cls) -> BenchSettings:
        return cls()

    @classmethod
    def quick_settings(cls) -> BenchSettings:
        return cls(
            quick=True,
            steer_requests=32,
            steer_tokens=32,
            steer_rounds=5,
            distinct_tokens=16,
            distinct_rounds=5,
            grid_prompts=(8,),
            grid_tokens=8,
            grid_rounds=1,
            hf_batch_sizes=(4, 8),
            roofline_seconds=0.3,
            rotation_shapes=((4096, 896),),
            rotation_rounds=5,
            rotation_in_graph_tokens=(64,),
            extract_limit=16,
            extract_dtypes=("float32",),
        )

    @classmethod
    def tiny(cls) -> BenchSettings:
        """Machinery only (the test suite): a 2-layer model, eager engines, a few tokens."""
        return cls(
            quick=True,
            model=TINY,
            grid_model=TINY,
            enforce_eager=True,
            warmup=0,
            settle_s=0.0,
            idle_probe_s=0.2,
            steer_requests=4,
            steer_tokens=4,
            steer_rounds=1,
            distinct_requests=8,
            distinct_tokens=2,
            distinct_rounds=1,
            grid_angles=4,
            grid_prompts=(2,),
            grid_tokens=2,
            grid_rounds=1,
            hf_dtypes=("float32",),
            hf_batch_sizes=(2,),
            roofline_seconds=0.02,
            rotation_shapes=((64, 128),),
            rotation_rounds=1,
            rotation_compile=False,
            extract_limit=4,
            extract_batch_size=8,
            extract_dtypes=("float32",),
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.name
        d["grid_model"] = self.grid_model.name
        d["engine"] = {
            "dtype": self.dtype,
            "enforce_eager": self.enforce_eager,
            "max_model_len": self.max_model_len,
            "kv_cache_gib": self.kv_cache_gib,
            "prefix_caching": False,
        }
        return d


@dataclass
class Context:
    settings: BenchSettings
    models_root: Path
    log: Callable[[str], None]
    details: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)


def _instructions(n: int) -> list[str]:
    """n instructions from data/prompts (harmful and harmless interleaved), repeated if short."""
    from rotserve.prompts import DEFAULT_PROMPTS, load_prompts

    harmful = [p.instruction for p in load_prompts(DEFAULT_PROMPTS["harmful"])]
    harmless = [p.instruction for p in load_prompts(DEFAULT_PROMPTS["harmless"])]
    mixed = [x for pair in zip(harmful, harmless, strict=False) for x in pair]
    return [mixed[i % len(mixed)] for i in range(n)]


def _angles(n: int) -> list[float]:
    """n evenly spaced angles in [0, 360): 36 -> every 10 deg, 72 -> every 5 deg."""
    return [round(360.0 * i / n, 6) for i in range(n)]


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


# --- sections ---------------------------------------------------------------------------------


def run_rotation(ctx: Context) -> None:
    from rotserve.bench.rotation_op import run_in_child

    s = ctx.settings
    ctx.log("rotation op vs copy (child process)")
    res = run_in_child(
        {
            "shapes": [list(x) for x in s.rotation_shapes],
            "rounds": s.rotation_rounds,
            "compile_variants": s.rotation_compile,
            "in_graph_tokens": list(s.rotation_in_graph_tokens),
            "in_graph_sites": s.rotation_in_graph_sites,
        },
        ctx.log,
    )
    head = s.rotation_shapes[0]
    cases = [c for c in res["cases"] if (c["tokens"], c["hidden"]) == head]
    res["headline_shape"] = f"{head[0]}x{head[1]}"
    res["rotation_vs_copy"] = max(c["best_shipped_vs_copy"] for c in cases)
    res["any_form_vs_copy"] = max(c["best_vs_copy"] for c in cases)
    ctx.details["rotation_op"] = res


def _extract_once(ctx: Context, out_dir: Path, dtype: str) -> dict[str, Any]:
    s = ctx.settings
    model = model_dir(s.model, ctx.models_root)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "rotserve.bench.extract_child",
            str(model),
            tmp,
            "--batch-size",
            str(s.extract_batch_size),
            "--dtype",
            dtype,
        ]
        if s.extract_limit is not None:
            cmd += ["--limit", str(s.extract_limit)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
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


def run_extract(ctx: Context, out_dir: Path) -> None:
    """One child process per dtype, so each peak RSS is that extraction's own."""
    ctx.log(f"extraction on {ctx.settings.model.name} (child process per dtype)")
    runs = [_extract_once(ctx, out_dir, dtype) for dtype in ctx.settings.extract_dtypes]
    ctx.details["extract"] = {**runs[0], "by_dtype": runs}


def _start_engines(ctx: Context, shape: ModelShape, stock: bool) -> dict[str, Any]:
    from rotserve.bench.engines import BenchEngine

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


def _round_logger(ctx: Context, label: str) -> Callable[[int, dict[str, Any], float], None]:
    def on_round(r: int, runs: dict[str, Any], external: float) -> None:
        noisy = " (discarded: busy machine)" if external > MAX_EXTERNAL_CORES else ""
        ctx.log(
            f"  {label} round {r + 1}: "
            + ", ".join(f"{k} {v.rate:.1f}/s ({v.seconds:.1f} s)" for k, v in runs.items())
            + f"; other processes {external:.2f} cores{noisy}"
        )

    return on_round


def _summarise(rounds: Rounds, num: str, den: str) -> dict[str, Any]:
    return {
        num: rounds.summary(num),
        den: rounds.summary(den),
        "paired_ratios": rounds.paired_ratios(num, den),
        "ratio": rounds.ratio(num, den),
        "external_cores_per_round": rounds.external,
        "discarded_rounds": rounds.discarded,
    }


def run_steer(ctx: Context, engines: dict[str, Any]) -> None:
    s = ctx.settings
    instr = _instructions(s.steer_requests)
    # A different angle for every request: the case a single-angle engine cannot serve.
    angles = _angles(s.steer_requests)
    stock, rot = engines["stock"], engines["rotserve"]
    ctx.log(f"steering overhead: {s.steer_requests} requests x {s.steer_tokens} tokens")
    rounds = alternate(
        {
            "rotserve": lambda: rot.generate(instr, angles, s.steer_tokens),
            "stock": lambda: stock.generate(instr, [None] * len(instr), s.steer_tokens),
        },
        s.steer_rounds,
        s.warmup,
        _round_logger(ctx, "steer"),
        settle_s=s.settle_s,
        max_external=MAX_EXTERNAL_CORES,
        max_retries=s.steer_rounds,
    )
    lengths = rot.prompt_tokens(instr)
    ctx.details["steer_overhead"] = {
        "requests": s.steer_requests,
        "max_tokens": s.steer_tokens,
        "rounds": s.steer_rounds,
        "layers": s.model.num_layers,
        "sites_per_layer": 2,
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths),
        "angles": "distinct per request: " + f"{angles[0]}..{angles[-1]}",
        **_summarise(rounds, "rotserve", "stock"),
    }


def run_distinct(ctx: Context, engines: dict[str, Any]) -> None:
    s = ctx.settings
    rot = engines["rotserve"]
    n = s.distinct_requests
    instr = _instructions(n)
    ctx.log(f"distinct angles: {n} requests x {s.distinct_tokens} tokens")
    rounds = alternate(
        {
            "distinct": lambda: rot.generate(instr, _angles(n), s.distinct_tokens),
            "shared": lambda: rot.generate(instr, [s.shared_angle] * n, s.distinct_tokens),
        },
        s.distinct_rounds,
        s.warmup,
        _round_logger(ctx, "distinct"),
        settle_s=s.settle_s,
        max_external=MAX_EXTERNAL_CORES,
        max_retries=s.distinct_rounds,
    )
    ctx.details["distinct_angles"] = {
        "requests": n,
        "max_tokens": s.distinct_tokens,
        "rounds": s.distinct_rounds,
        "shared_angle": s.shared_angle,
        **_summarise(rounds, "distinct", "shared"),
    }


def run_grid(ctx: Context, engines: dict[str, Any]) -> None:
    import torch

    from rotserve.bench.hf_grid import HFGrid, probe_best
    from rotserve.bench.roofline import achieved_tflops, measure_matmul_peak

    s = ctx.settings
    rot = engines["rotserve"]
    shape = s.grid_model
    angles = _angles(s.grid_angles)
    # The baseline at its best: HF uses every core.
    torch.set_num_threads(os.cpu_count() or 1)
    peak = measure_matmul_peak(shape, seconds=s.roofline_seconds)
    ctx.log(f"grid: {shape.name} MLP matmul peak {peak['peak_tflops']:.3f} TFLOP/s (bfloat16)")
    hf_grids = [
        HFGrid(model_dir(shape, ctx.models_root), plane_file(shape, ctx.models_root), dtype)
        for dtype in s.hf_dtypes
    ]
    results = []
    for n in s.grid_prompts:
        instr = _instructions(n)
        # Every (prompt, angle) pair of the grid is one request, all in one generate call.
        grid_instr = [t for _ in angles for t in instr]
        grid_angles = [a for a in angles for _ in instr]
        ctx.log(f"grid: {s.grid_angles} angles x {n} prompts x {s.grid_tokens} tokens; HF probe")
        batch_sizes = sorted({min(b, n) for b in s.hf_batch_sizes})
        hf, best_bs, trials = probe_best(hf_grids, instr, s.grid_tokens, batch_sizes, ctx.log)
        rounds = alternate(
            {
                "rotserve": lambda gi=grid_instr, ga=grid_angles: rot.generate(
                    gi, ga, s.grid_tokens
                ),
                "hf": lambda hf=hf, instr=instr, bs=best_bs: hf.grid(
                    instr, angles, s.grid_tokens, bs
                ),
            },
            s.grid_rounds,
            warmup=0,  # both sides are warm: rotserve from earlier sections, HF from the probe
            on_round=_round_logger(ctx, "grid"),
            settle_s=s.settle_s,
            max_external=MAX_EXTERNAL_CORES,
            max_retries=1,  # an HF grid takes minutes: one re-run at most
        )
        # Tokens each contender pushes through the model per grid: every prompt once per
        # angle (prefix caching is off in the engines) plus every generated token.
        prompt_tokens = sum(len(hf.gen.tokenizer(p)["input_ids"]) for p in hf.prompts(instr))
        processed = len(angles) * (prompt_tokens + n * s.grid_tokens)
        seconds = {k: rounds.median_seconds(k) for k in ("rotserve", "hf")}
        achieved = {k: achieved_tflops(processed, t, shape) for k, t in seconds.items()}
        results.append(
            {
                "model": shape.name,
                "roofline": {
                    "tokens_processed_per_grid": processed,
                    "achieved_tflops": achieved,
                    "share_of_peak": {k: v / peak["peak_tflops"] for k, v in achieved.items()},
                    # No engine doing the same matmuls beats the baseline by more than this.
                    "speedup_ceiling": peak["peak_tflops"] / achieved["hf"],
                },
                "angles": s.grid_angles,
                "prompts": n,
                "max_tokens": s.grid_tokens,
                "tokens_per_grid": s.grid_angles * n * s.grid_tokens,
                "rounds": s.grid_rounds,
                "hf_probe": trials,
                "hf_best": {"dtype": hf.dtype, "batch_size": best_bs},
                "hf_threads": torch.get_num_threads(),
                "speedup": rounds.ratio("rotserve", "hf"),
                **_summarise(rounds, "rotserve", "hf"),
            }
        )
    # Headline: the largest prompt count, where HF batches best (the conservative number).
    ctx.details["grid"] = {**results[-1], "by_prompts": results, "matmul_peak": peak}


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
    from rotserve.bench.engines import set_engine_env
    from rotserve.bench.report import render_markdown, write_markdown
    from rotserve.extract import display_path

    t_start = time.perf_counter()
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
    for shape in {settings.model, settings.grid_model}:
        model_dir(shape, root)  # build once, before anything is timed

    if "rotation" in sections:
        run_rotation(ctx)
    if "extract" in sections:
        run_extract(ctx, out_dir)
    ctx.load["before_engines"] = loadavg()
    engines: dict[str, Any] = {}
    try:
        if sections & {"steer", "distinct"}:
            engines = _start_engines(ctx, settings.model, stock="steer" in sections)
            if "steer" in sections:
                run_steer(ctx, engines)
            if "distinct" in sections:
                run_distinct(ctx, engines)
        if "grid" in sections:
            if settings.grid_model != settings.model or "rotserve" not in engines:
                for e in engines.values():
                    e.close()
                engines = _start_engines(ctx, settings.grid_model, stock=False)
            elif "stock" in engines:
                engines.pop("stock").close()  # the grid needs one engine; free its core
            run_grid(ctx, engines)
    finally:
        for e in engines.values():
            e.close()
    ctx.load["end"] = loadavg()

    d = ctx.details
    doc: dict[str, Any] = {
        "steer_overhead_ratio": d.get("steer_overhead", {}).get("ratio"),
        "grid_speedup": d.get("grid", {}).get("speedup"),
        "distinct_angles_ratio": d.get("distinct_angles", {}).get("ratio"),
        "rotation_vs_copy": d.get("rotation_op", {}).get("rotation_vs_copy"),
        "extract_prompts_per_s": d.get("extract", {}).get("prompts_per_s"),
        "device": device_label(mach),
    }
    doc.update(
        {
            "rotation_vs_copy_any_form": d.get("rotation_op", {}).get("any_form_vs_copy"),
            "extract_peak_rss_bytes": d.get("extract", {}).get("peak_rss_bytes"),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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


def with_sections(settings: BenchSettings, sections: list[str]) -> BenchSettings:
    return replace(settings, sections=tuple(sections))
