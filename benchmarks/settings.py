"""The sizes of every benchmark section: `BenchSettings`, for the full run, --quick and the
test suite's tiny run, and the sections a run selects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from benchmarks.models import QWEN25_05B, TINY, ModelShape
from benchmarks.report import SECTION_TITLES

SECTIONS = tuple(SECTION_TITLES)


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
    # Capability: one lm-eval task (the shipped MC task, 24 documents) at baseline + N angles,
    # rotserve's mixed pass vs lm-eval's local-completions through the server per setting, and
    # a grid shard of P prompts at the same settings for scale.
    capability_task: str = "toy_reply_mc"
    capability_angles: int = 18  # 0: skip the section
    capability_rounds: int = 2
    capability_grid_prompts: int = 16
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
            capability_angles=8,
            capability_grid_prompts=8,
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
            # No capability section (it starts a server too, a minute here): jobs/bench.py runs
            # it; tests/test_capability.py runs its pieces end to end.
            capability_angles=0,
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


def with_sections(settings: BenchSettings, sections: list[str]) -> BenchSettings:
    return replace(settings, sections=tuple(sections))
