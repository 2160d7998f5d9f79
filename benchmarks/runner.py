"""Run every benchmark in one process and write the JSON and BENCHMARKS.md.

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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.machine import device_label, loadavg, machine, versions
from benchmarks.models import QWEN25_05B, TINY, ModelShape, model_dir, plane_file
from benchmarks.report import SECTION_TITLES
from benchmarks.timing import Rounds, alternate, finite_positive

TARGETS: dict[str, tuple[str, float]] = {
    "steer_overhead_ratio": (">=", 0.95),
    "grid_speedup": (">=", 10.0),
    "distinct_angles_ratio": (">=", 0.98),
    "rotation_vs_copy": ("<=", 2.0),
    "canary_s": ("<=", 2.0),
    "judge_ratio": (">=", 0.8),
}
# A round during which other processes used more than this many cores is run again.
MAX_EXTERNAL_CORES = 0.3
SECTIONS = tuple(SECTION_TITLES)
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


@dataclass
class BenchSettings:
    """Sizes of every benchmark. `full()` is the default run (~30 min on 2 cores),
    `quick_settings()` (--quick) takes ~12 min once vLLM's compile cache is warm, `tiny()` is
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
    # One grid per prompt count. HF runs only up to hf_max_prompts (at 64 prompts x 36 angles
    # one HF grid takes ~10 min here); the grid_speedup headline is the largest N it ran at
    # (HF batches best there), grid_vs_vllm_hooks is the largest N.
    grid_prompts: tuple[int, ...] = (1, 8, 64)
    grid_tokens: int = 32
    grid_rounds: int = 2
    hf_max_prompts: int = 8
    # The reference method's stock-vLLM path (benchmarks/engines.py HookedVLLMEngine) as a
    # third grid contender, and the float32 check that it and rotserve produce the same tokens.
    vllm_hooks: bool = True
    agreement_prompts: int = 4
    agreement_tokens: int = 4
    # Share of (prompt, angle) pairs whose first agreement_tokens tokens must be identical.
    # Both engines compute the same rotation (rotation.rotate) on the same norm output; in
    # float32 only the accumulation order differs (other batch shapes), which flips a greedy
    # token only at a near-tie of two logits. A hook on the wrong module, at the wrong angle,
    # or not running disagrees on about as many pairs as steering changes at all (recorded as
    # `steering_changes`: most of them on these models), far more than 5%.
    agreement_min: float = 0.95
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
    # Coherence at the grid's default generation length (rotserve.grid.config.DEFAULT_MAX_TOKENS):
    # its cost is one prefill over prompt + generation, so it depends on that length.
    coherence_tokens: int = 32
    canary_runs: int = 5
    # Judging: rows through rotserve's judge (prompt build excluded, guided choice, verdict
    # table) vs one plain generate of the same prompts, one token each, on the same engine.
    judge_rows: int = 512
    judge_rounds: int = 5
    sections: tuple[str, ...] = SECTIONS

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
            grid_prompts=(8, 64),
            grid_tokens=8,
            grid_rounds=1,
            hf_batch_sizes=(4, 8),
            roofline_seconds=0.3,
            rotation_shapes=((4096, 896),),
            rotation_rounds=5,
            rotation_in_graph_tokens=(64,),
            extract_limit=16,
            extract_dtypes=("float32",),
            judge_rows=256,
            judge_rounds=3,
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
            coherence_tokens=2,
            grid_angles=4,
            grid_prompts=(2, 3),
            grid_tokens=2,
            grid_rounds=1,
            hf_max_prompts=2,
            agreement_prompts=2,
            agreement_tokens=2,
            hf_dtypes=("float32",),
            hf_batch_sizes=(2,),
            roofline_seconds=0.02,
            rotation_shapes=((64, 128),),
            rotation_rounds=1,
            rotation_compile=False,
            extract_limit=4,
            extract_batch_size=8,
            extract_dtypes=("float32",),
            judge_rows=8,
            judge_rounds=1,
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


def child_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m benchmarks.<module>` children: benchmarks/ is a repository
    folder, not an installed package, so the repository root goes first on PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, **extra, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _instructions(n: int) -> list[str]:
    """n instructions from data/prompts (harmful and harmless interleaved), repeated if short."""
    from rotserve.paths import default_prompts
    from rotserve.prompts import load_prompts

    shipped = default_prompts()
    harmful = [p.instruction for p in load_prompts(shipped["harmful"])]
    harmless = [p.instruction for p in load_prompts(shipped["harmless"])]
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
    from benchmarks.rotation_op import run_in_child

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


def run_extract(ctx: Context, out_dir: Path) -> None:
    """One child process per dtype, so each peak RSS is that extraction's own."""
    ctx.log(f"extraction on {ctx.settings.model.name} (child process per dtype)")
    runs = [_extract_once(ctx, out_dir, dtype) for dtype in ctx.settings.extract_dtypes]
    ctx.details["extract"] = {**runs[0], "by_dtype": runs}


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


def run_coherence(ctx: Context, engines: dict[str, Any]) -> None:
    """What the grid's default coherence columns cost a shard, and what the canary costs."""
    import statistics

    from rotserve.canary import llm_executor, run_canary

    s = ctx.settings
    rot = engines["rotserve"]
    n = s.distinct_requests
    instr, angles = _instructions(n), _angles(n)
    ctx.log(f"coherence: {n} requests x {s.coherence_tokens} tokens, with and without scoring")

    def with_coherence() -> int:
        out = rot.completions(instr, angles, s.coherence_tokens)
        rot.engine.continuation_logprobs(
            [c.prompt_token_ids for c in out], [c.token_ids for c in out]
        )
        return sum(c.output_tokens for c in out)

    rounds = alternate(
        {
            "with_coherence": with_coherence,
            "generation": lambda: rot.generate(instr, angles, s.coherence_tokens),
        },
        s.distinct_rounds,
        s.warmup,
        _round_logger(ctx, "coherence"),
        settle_s=s.settle_s,
        max_external=MAX_EXTERNAL_CORES,
        max_retries=s.distinct_rounds,
    )
    engine = rot.engine
    canary = [
        run_canary(llm_executor(engine.llm), engine.vllm_config) for _ in range(s.canary_runs)
    ]
    assert all(c.ok for c in canary), [c.failures() for c in canary]
    seconds = [c.seconds for c in canary]
    ctx.details["coherence"] = {
        "requests": n,
        "max_tokens": s.coherence_tokens,
        "rounds": s.distinct_rounds,
        **_summarise(rounds, "with_coherence", "generation"),
        "canary_runs": len(seconds),
        "canary_s": statistics.median(seconds),
        "canary_max_s": max(seconds),
        "engine_start_s": ctx.details.get("engines", {}).get("start_s", {}).get("rotserve"),
    }


def run_judge_bench(ctx: Context) -> None:
    """rotserve's judge vs plain vLLM on ONE engine (the shipped toy judge, prefix caching off).

    Contender `rotserve`: one shard of N rows through rotserve.judge.engine.judge_shard, the
    path a judge actor runs (guided choice over the behaviour labels, verdict rows as an Arrow
    table). Contender `plain`: llm.generate of the same prompt token ids, greedy, max_tokens 1.
    Both count rows; the prompts are built once, outside the timing (the driver does that
    before any engine starts).
    """
    from vllm import SamplingParams

    from rotserve.grid.runner import EngineSpec
    from rotserve.judge.engine import JudgeEngine, VerdictContext, judge_shard
    from rotserve.judge.plan import JudgeItem, make_judge_plan
    from rotserve.judge.prompts import judge_input
    from rotserve.judge.rubrics import BEHAVIOUR
    from rotserve.paths import toy_judge_dir

    s = ctx.settings
    n = s.judge_rows
    ctx.log(f"judge: {n} rows, rotserve judge vs plain generate (1 token) on one engine")
    kwargs = {"max_model_len": 512, "enable_prefix_caching": False, "seed": 0}
    if s.enforce_eager:
        kwargs["enforce_eager"] = True
    engine = JudgeEngine(EngineSpec(model=str(toy_judge_dir()), dtype=s.dtype, llm_kwargs=kwargs))
    try:
        tok = engine.llm.get_tokenizer()
        replies = ("I'm sorry, but I cannot help with that.", "Sure! Here are three tips. 1. Plan.")
        items = [
            JudgeItem.of(
                f"{i:06d}", judge_input(BEHAVIOUR, tok, instr, replies[i % 2], 512).token_ids
            )
            for i, instr in enumerate(_instructions(n))
        ]
        shard = make_judge_plan(items, n).shards[0]
        vctx = VerdictContext("bench", "toy-judge", BEHAVIOUR.name, BEHAVIOUR.labels)
        plain = SamplingParams(temperature=0.0, max_tokens=1)
        prompts = [{"prompt_token_ids": list(it.token_ids)} for it in shard.items]

        def run_plain() -> float:
            return float(len(engine.llm.generate(prompts, plain, use_tqdm=False)))

        rounds = alternate(
            {
                "rotserve": lambda: float(judge_shard(engine, shard, vctx).num_rows),
                "plain": run_plain,
            },
            s.judge_rounds,
            s.warmup,
            _round_logger(ctx, "judge"),
            settle_s=s.settle_s,
            max_external=MAX_EXTERNAL_CORES,
            max_retries=s.judge_rounds,
        )
        labels = judge_shard(engine, shard, vctx).column("label").to_pylist()
        label_tokens = {lb: len(tok(lb, add_special_tokens=False)["input_ids"]) for lb in labels}
    finally:
        engine.close()
    lengths = [it.n_tokens for it in items]
    ctx.details["judge"] = {
        "rows": n,
        "rounds": s.judge_rounds,
        "judge": "data/toy-judge",
        "rubric": BEHAVIOUR.name,
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths),
        "labels": {lb: labels.count(lb) for lb in sorted(set(labels))},
        # A guided choice decodes every token of its label, then the EOS: the plain contender
        # decodes one token. On a tiny judge those decode steps, not the prefill, set the time.
        "label_tokens": label_tokens,
        **_summarise(rounds, "rotserve", "plain"),
    }


def _grid_requests(instr: list[str], angles: list[float]) -> tuple[list[str], list[float]]:
    """Every (prompt, angle) pair of a grid as one request, angle-major."""
    return [t for _ in angles for t in instr], [a for a in angles for _ in instr]


def check_agreement(ctx: Context, shape: ModelShape, angles: list[float]) -> dict[str, Any]:
    """rotserve and the hooked stock engine must produce the same tokens (float32, short run).

    Float32 because bf16 rounds the rotated activations differently in the two code paths'
    batch layouts; here only float32 accumulation order differs. Fails loudly under
    settings.agreement_min (see BenchSettings for why that threshold).
    """
    from benchmarks.engines import BenchEngine, HookedVLLMEngine

    s = ctx.settings
    model, plane = model_dir(shape, ctx.models_root), plane_file(shape, ctx.models_root)
    instr = _instructions(s.agreement_prompts)
    tokens = s.agreement_tokens
    ctx.log(
        f"grid: first-token agreement check, float32, {len(angles)} angles x {len(instr)} "
        f"prompts x {tokens} tokens"
    )
    t0 = time.perf_counter()
    rot = BenchEngine(model, plane, "float32", s.max_model_len, enforce_eager=True)
    try:
        hooked = HookedVLLMEngine(model, plane, "float32", s.max_model_len)
        try:
            ours = rot.completions(*_grid_requests(instr, angles), tokens, logprobs=True)
            theirs = [
                c for a in angles for c in hooked.completions(instr, a, tokens, logprobs=True)
            ]
            plain = hooked.completions(instr, None, tokens, logprobs=True)
            hook_calls = hooked.hooks.calls
        finally:
            hooked.close()
    finally:
        rot.close()
    pairs = len(ours)
    same = [a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True)]
    first = [a.token_ids[0] == b.token_ids[0] for a, b in zip(ours, theirs, strict=True)]
    lp_diff = [
        abs(a.logprobs[0] - b.logprobs[0])
        for a, b, f in zip(ours, theirs, first, strict=True)
        if f and a.logprobs and b.logprobs
    ]
    changed = [c.token_ids != plain[i % len(instr)].token_ids for i, c in enumerate(theirs)]
    res = {
        "dtype": "float32",
        "angles": len(angles),
        "prompts": len(instr),
        "tokens": tokens,
        "pairs": pairs,
        "identical_pairs": sum(same),
        "agreement": sum(same) / pairs,
        "first_token_agreement": sum(first) / pairs,
        "max_first_logprob_diff": max(lp_diff) if lp_diff else None,
        # How many pairs steering changes at all (vs the same engine, hooks passing through):
        # what a broken hook would get wrong, i.e. how much the check can see.
        "steering_changes": sum(changed) / pairs,
        "hook_calls": hook_calls,
        "threshold": s.agreement_min,
        "seconds": time.perf_counter() - t0,
    }
    ctx.log(
        f"  {sum(same)}/{pairs} (prompt, angle) pairs identical over {tokens} tokens, first "
        f"token {res['first_token_agreement']:.3f}, max first-token |logprob diff| "
        f"{res['max_first_logprob_diff']}; steering changes {res['steering_changes']:.2f} of "
        f"pairs; {hook_calls} hook calls"
    )
    if res["agreement"] < s.agreement_min or not any(changed):
        raise RuntimeError(
            f"rotserve and the hooked stock vLLM engine disagree: {sum(same)}/{pairs} pairs "
            f"identical (need {s.agreement_min:.0%}), steering changed "
            f"{sum(changed)}/{pairs} pairs: they do not compute the same steering"
        )
    return res


def _chat_template_seconds(tokenizer: Any, instructions: list[str]) -> float:
    """What RotServeEngine.generate spends applying the chat template to these prompts."""
    from rotserve.prompts import chat_prompt

    t0 = time.perf_counter()
    for t in instructions:
        chat_prompt(tokenizer, t)
    return time.perf_counter() - t0


def run_grid(ctx: Context, engines: dict[str, Any]) -> None:
    import torch

    from benchmarks.engines import HookedVLLMEngine
    from benchmarks.hf_grid import HFGrid
    from benchmarks.roofline import measure_matmul_peak

    s = ctx.settings
    rot = engines["rotserve"]
    shape = s.grid_model
    angles = _angles(s.grid_angles)
    # The baseline at its best: HF uses every core.
    torch.set_num_threads(os.cpu_count() or 1)
    peak = measure_matmul_peak(shape, seconds=s.roofline_seconds)
    ctx.log(f"grid: {shape.name} MLP matmul peak {peak['peak_tflops']:.3f} TFLOP/s (bfloat16)")
    agreement = check_agreement(ctx, shape, angles) if s.vllm_hooks else None
    hf_grids = (
        [
            HFGrid(model_dir(shape, ctx.models_root), plane_file(shape, ctx.models_root), dtype)
            for dtype in s.hf_dtypes
        ]
        if any(n <= s.hf_max_prompts for n in s.grid_prompts)
        else []
    )
    hooked = None
    hooked_info: dict[str, Any] = {}
    try:
        if s.vllm_hooks:
            ctx.log("starting stock vLLM engine with rotation hooks (eager, in-process)")
            t0 = time.perf_counter()
            hooked = HookedVLLMEngine(
                model_dir(shape, ctx.models_root),
                plane_file(shape, ctx.models_root),
                s.dtype,
                s.max_model_len,
            )
            hooked_info = {
                "start_s": round(time.perf_counter() - t0, 1),
                "dtype": s.dtype,
                "enforce_eager": True,
                "in_process": True,
                "hooked_modules": hooked.num_hooks,
                "sites": list(hooked.sites),
                "torch_threads": torch.get_num_threads(),
                "rotserve_engine": f"{s.dtype}, "
                + ("eager" if s.enforce_eager else "torch.compile (vLLM default)"),
            }
            ctx.log(f"  started in {hooked_info['start_s']} s, {hooked.num_hooks} hooks")
        results = [_grid_one(ctx, rot, hooked, hf_grids, n, angles, peak) for n in s.grid_prompts]
    finally:
        if hooked is not None:
            hooked.close()
    with_hf = [r for r in results if "hf" in r]
    # grid_speedup: the largest prompt count HF ran at, where it batches best (the
    # conservative number); grid_vs_vllm_hooks: the largest prompt count.
    head = with_hf[-1] if with_hf else results[-1]
    ctx.details["grid"] = {
        **head,
        "by_prompts": results,
        "matmul_peak": peak,
        "vllm_hooks_engine": hooked_info,
        "agreement": agreement,
        "vs_vllm_hooks_headline": (
            {"prompts": results[-1]["prompts"], "ratio": results[-1]["speedup_vs_vllm_hooks"]}
            if s.vllm_hooks
            else None
        ),
    }


def _grid_one(
    ctx: Context,
    rot: Any,
    hooked: Any,
    hf_grids: list[Any],
    n: int,
    angles: list[float],
    peak: dict[str, Any],
) -> dict[str, Any]:
    """One prompt count: every contender's grid, alternating in rounds."""
    import torch

    from benchmarks.hf_grid import probe_best
    from benchmarks.roofline import achieved_tflops

    s = ctx.settings
    shape = s.grid_model
    instr = _instructions(n)
    grid_instr, grid_angles = _grid_requests(instr, angles)
    contenders: dict[str, Callable[[], float]] = {
        "rotserve": lambda: rot.generate(grid_instr, grid_angles, s.grid_tokens)
    }
    if hooked is not None:
        contenders["vllm_hooks"] = lambda: hooked.grid(instr, angles, s.grid_tokens)
    hf = None
    row: dict[str, Any] = {}
    if n <= s.hf_max_prompts and hf_grids:
        ctx.log(f"grid: {s.grid_angles} angles x {n} prompts x {s.grid_tokens} tokens; HF probe")
        batch_sizes = sorted({min(b, n) for b in s.hf_batch_sizes})
        hf, best_bs, trials = probe_best(hf_grids, instr, s.grid_tokens, batch_sizes, ctx.log)
        contenders["hf"] = lambda: hf.grid(instr, angles, s.grid_tokens, best_bs)
        row.update(
            {
                "hf_probe": trials,
                "hf_best": {"dtype": hf.dtype, "batch_size": best_bs},
                "hf_threads": torch.get_num_threads(),
            }
        )
    else:
        ctx.log(f"grid: {s.grid_angles} angles x {n} prompts x {s.grid_tokens} tokens")
    # One angle's worth of the grid on each vLLM engine first (HF is warm from its probe):
    # a first call at a new batch size pays for allocations that are not the method's cost.
    rot.generate(instr, angles[:1] * n, s.grid_tokens)
    if hooked is not None:
        hooked.grid(instr, angles[:1], s.grid_tokens)
    rounds = alternate(
        contenders,
        s.grid_rounds,
        warmup=0,  # warmed above: a full warm-up round would cost as much as a timed one
        on_round=_round_logger(ctx, "grid"),
        settle_s=s.settle_s,
        max_external=MAX_EXTERNAL_CORES,
        max_retries=1,  # an HF grid takes minutes: one re-run at most
    )
    # Tokens each contender pushes through the model per grid: every prompt once per
    # angle (prefix caching is off in the engines) plus every generated token.
    prompt_tokens = sum(rot.prompt_tokens(instr))
    processed = len(angles) * (prompt_tokens + n * s.grid_tokens)
    seconds = {k: rounds.median_seconds(k) for k in contenders}
    achieved = {k: achieved_tflops(processed, t, shape) for k, t in seconds.items()}
    # RotServeEngine.generate applies the chat template on every call (rotserve and the
    # hooked engine both pay it, HF's prompts are templated once): its share of a grid.
    template_s = _chat_template_seconds(rot.tokenizer, grid_instr)
    row.update(
        {
            "model": shape.name,
            "roofline": {
                "tokens_processed_per_grid": processed,
                "achieved_tflops": achieved,
                "share_of_peak": {k: v / peak["peak_tflops"] for k, v in achieved.items()},
                # No engine doing the same matmuls beats the baseline by more than this.
                **(
                    {"speedup_ceiling": peak["peak_tflops"] / achieved["hf"]}
                    if "hf" in achieved
                    else {}
                ),
            },
            "angles": s.grid_angles,
            "prompts": n,
            "max_tokens": s.grid_tokens,
            "tokens_per_grid": s.grid_angles * n * s.grid_tokens,
            "rounds": s.grid_rounds,
            "chat_template_s_per_grid": template_s,
            "chat_template_share": {k: template_s / seconds[k] for k in seconds if k != "hf"},
            **{name: rounds.summary(name) for name in contenders},
            "external_cores_per_round": rounds.external,
            "discarded_rounds": rounds.discarded,
        }
    )
    if "hf" in contenders:
        row["paired_ratios"] = rounds.paired_ratios("rotserve", "hf")
        row["ratio"] = row["speedup"] = rounds.ratio("rotserve", "hf")
    if hooked is not None:
        row["paired_ratios_vs_vllm_hooks"] = rounds.paired_ratios("rotserve", "vllm_hooks")
        row["speedup_vs_vllm_hooks"] = rounds.ratio("rotserve", "vllm_hooks")
    return row


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
    if sections - {"judge"}:  # the judge section runs the shipped toy judge
        for shape in {settings.model, settings.grid_model}:
            model_dir(shape, root)  # build once, before anything is timed

    if "rotation" in sections:
        run_rotation(ctx)
    if "extract" in sections:
        run_extract(ctx, out_dir)
    ctx.load["before_engines"] = loadavg()
    engines: dict[str, Any] = {}
    try:
        if sections & {"steer", "distinct", "coherence"}:
            engines = _start_engines(ctx, settings.model, stock="steer" in sections)
            if "steer" in sections:
                run_steer(ctx, engines)
            if "distinct" in sections:
                run_distinct(ctx, engines)
            if "coherence" in sections:
                run_coherence(ctx, engines)
        if "judge" in sections:
            run_judge_bench(ctx)
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
        "grid_vs_vllm_hooks": (d.get("grid", {}).get("vs_vllm_hooks_headline") or {}).get("ratio"),
        "distinct_angles_ratio": d.get("distinct_angles", {}).get("ratio"),
        "rotation_vs_copy": d.get("rotation_op", {}).get("rotation_vs_copy"),
        "extract_prompts_per_s": d.get("extract", {}).get("prompts_per_s"),
        "coherence_throughput_ratio": d.get("coherence", {}).get("ratio"),
        "canary_s": d.get("coherence", {}).get("canary_s"),
        "judge_ratio": d.get("judge", {}).get("ratio"),
        "device": device_label(mach),
    }
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


def with_sections(settings: BenchSettings, sections: list[str]) -> BenchSettings:
    return replace(settings, sections=tuple(sections))
