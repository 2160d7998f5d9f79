"""The steering vocabulary without vLLM: architectures, windows, requests, engine settings, and
the plugin's torch-only state (token -> slot mapping, rotation table). These must import and
work where vLLM is not installed (the frontend-side validation, the grid's resolve step and the
HF oracle use them), so the last test runs this whole file again with `import vllm` failing.
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rotserve.plane import orthonormal_plane
from rotserve.rotation import angle_table, rotate
from rotserve.steering import (
    ARCHITECTURES,
    ROTATED_ARCHITECTURES,
    EngineSteering,
    PlaneCatalog,
    RequestSteering,
    RequestSteeringError,
    RotServeConfigError,
    UnsupportedArchitectureError,
    WindowError,
    architecture,
    canonical_window,
    parse_request,
    parse_window,
    rotated_architecture,
)
from rotserve.steering.table import RequestRows, RotationState, token_slots

ROOT = Path(__file__).resolve().parents[1]

# -- request and engine settings ---------------------------------------------------------------


def test_parse_request_accepts_both_forms_and_numpy():
    assert parse_request(None) == RequestSteering()
    assert parse_request({"other_plugin": 1}) == RequestSteering()  # not ours: ignored
    assert parse_request({"rotserve": {"angle": None}}).angle is None
    nested = parse_request({"rotserve": {"angle": 90, "adaptive": True, "mode": "relative"}})
    flat = parse_request(
        {"rotserve_angle": 90.0, "rotserve_adaptive": 1, "rotserve_mode": "relative"}
    )
    assert nested == flat == RequestSteering(90.0, True, "relative")
    for value in (np.float32(210), np.float64(210), np.int64(210)):
        steering = parse_request({"rotserve": {"angle": value, "adaptive": np.bool_(True)}})
        assert steering.angle == 210.0 and type(steering.angle) is float
        assert steering.adaptive is True
    # The canonical form is plain Python all the way down (safe for msgspec between processes).
    assert parse_request(nested.as_extra_args()) == nested
    assert json.loads(json.dumps(nested.as_extra_args())) == nested.as_extra_args()


@pytest.mark.parametrize(
    ("extra_args", "needle"),
    [
        ({"rotserve": {"angle": "ninety"}}, "must be a number"),
        ({"rotserve": {"angle": True}}, "must be a number"),
        ({"rotserve": {"angle": math.nan}}, "finite"),
        (
            {"rotserve": {"angel": 90}},
            "unknown rotserve argument(s) extra_args['rotserve']['angel']",
        ),
        ({"rotserve_angle": 90, "rotserve_foo": 1}, "unknown rotserve argument(s) rotserve_foo"),
        ({"rotserve": {"angle": 90}, "rotserve_angle": 90}, "not both"),
        ({"rotserve": 90}, "must be a mapping"),
        ({"rotserve": {"angle": 90, "mode": "sideways"}}, "absolute, relative"),
        ({"rotserve": {"angle": 90, "adaptive": "maybe"}}, "must be a boolean"),
    ],
)
def test_parse_request_rejects_bad_values(extra_args, needle):
    with pytest.raises(RequestSteeringError, match=re.escape(needle)):
        parse_request(extra_args)


def test_validator_refuses_numpy_scalars_with_a_clear_message():
    # vLLM cannot serialise numpy scalars between its processes (and 0.32's LLM.generate then
    # waits forever for the lost request), so the add-request validator refuses them.
    with pytest.raises(RequestSteeringError, match=r"float\(angle\)"):
        parse_request({"rotserve": {"angle": np.float32(90)}}, plain_types_only=True)
    assert parse_request({"rotserve": {"angle": 90.0}}, plain_types_only=True).angle == 90.0


def test_engine_steering_settings():
    with pytest.raises(RotServeConfigError, match="hf_overrides"):
        EngineSteering.from_hf_config(SimpleNamespace(), "RotServeQwen2ForCausalLM")
    with pytest.raises(RotServeConfigError, match="unknown key"):
        EngineSteering.from_dict({"plane": "/p.safetensors", "layer": [1]})
    with pytest.raises(RotServeConfigError, match="path of a .safetensors"):
        EngineSteering.from_dict({"plane": None})
    with pytest.raises(RotServeConfigError, match="non-empty list"):
        EngineSteering.from_dict({"plane": "/p.safetensors", "layers": []})
    s = EngineSteering.from_dict({"plane": "/p.safetensors", "layers": [0, -1], "sites": None})
    assert s.chosen_layers(4) == [0, 3]
    assert s.sites == ("input_layernorm", "post_attention_layernorm")
    assert EngineSteering.from_dict({"plane": "/p.safetensors"}).chosen_layers(3) == [0, 1, 2]
    with pytest.raises(RotServeConfigError, match="out of range"):
        EngineSteering.from_dict({"plane": "/p", "layers": [4]}).chosen_layers(4)
    assert EngineSteering.from_dict(s.to_dict()) == s


def test_rotated_architectures():
    assert rotated_architecture("Qwen2ForCausalLM") == "RotServeQwen2ForCausalLM"
    assert rotated_architecture("LlamaForCausalLM") == "RotServeLlamaForCausalLM"
    assert rotated_architecture("MistralForCausalLM") == "RotServeMistralForCausalLM"
    assert rotated_architecture("Qwen3ForCausalLM") == "RotServeQwen3ForCausalLM"
    with pytest.raises(UnsupportedArchitectureError, match="Gemma2ForCausalLM.*supported"):
        rotated_architecture("Gemma2ForCausalLM")


def test_one_architecture_table_serves_hf_reading_and_the_rotated_variants():
    # Gemma2 is read by extraction and the HF oracle (its MLP's input norm has its own name)
    # but has no rotated vLLM variant; the plugin registers exactly the table's variants.
    gemma = architecture("Gemma2ForCausalLM")
    assert (gemma.attn_norm, gemma.mlp_norm, gemma.rotated) == (
        "input_layernorm",
        "pre_feedforward_layernorm",
        None,
    )
    assert ROTATED_ARCHITECTURES == {
        a.name: a.rotated for a in ARCHITECTURES.values() if a.rotated is not None
    }
    assert set(ROTATED_ARCHITECTURES) == {
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
    }
    with pytest.raises(UnsupportedArchitectureError, match="'GPT2LMHeadModel' is not supported"):
        architecture("GPT2LMHeadModel")
    with pytest.raises(RotServeConfigError, match="GPT2LMHeadModel.*no rotated variant"):
        rotated_architecture("GPT2LMHeadModel")


def test_hf_and_the_plugin_sit_on_steering_and_neither_imports_the_other():
    def imported(folder: str) -> set[str]:
        names: set[str] = set()
        for path in (ROOT / "rotserve" / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names.add(node.module)
                elif isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
        return names

    assert not {n for n in imported("steering") if n.split(".")[0] == "vllm"}
    assert not {n for n in imported("steering") if n.startswith(("rotserve.hf", "rotserve.vllm"))}
    assert not {n for n in imported("hf") if n.startswith("rotserve.vllm_plugin")}
    assert not {n for n in imported("vllm_plugin") if n.startswith("rotserve.hf")}


# -- the one layer-window grammar --------------------------------------------------------------

TOY_LAYERS = 4  # data/toy-refusal, which `rotserve serve` and `rotserve extract` default to


def test_the_window_grammar():
    assert canonical_window(" ALL ") == "all" and canonical_window([]) == "none"
    assert canonical_window([3, -1]) == "3,-1" and canonical_window(2) == "2"
    assert canonical_window(":-1") == ":-1" and canonical_window("1:") == "1:"
    assert parse_window(":-1", 4) == [0, 1, 2] and parse_window("3,-1,3", 4) == [3]
    with pytest.raises(WindowError, match=r"--layers 'none' selects none of the model's 4"):
        parse_window("none", 4)
    with pytest.raises(WindowError, match=r"--layers '5:9' selects none of the model's 4"):
        parse_window("5:9", 4)
    with pytest.raises(WindowError, match=r"--layers must be a layer window: .*got '1:2:3'"):
        parse_window("1:2:3", 4)
    # A bad window in a request rejects that request only: it is a RequestSteeringError.
    assert issubclass(WindowError, RequestSteeringError)


def _catalog(num_layers: int = TOY_LAYERS) -> PlaneCatalog:
    return PlaneCatalog.build(EngineSteering.from_dict({"plane": "/p"}), ["pid"], num_layers)


@pytest.mark.parametrize(
    ("window", "layers"), [("-2:", [2, 3]), ("0,-1", [0, 3]), ("all", [0, 1, 2, 3])]
)
def test_commands_and_requests_read_one_window_grammar(window, layers):
    from rotserve.extract.config import ExtractConfig
    from rotserve.serve import build_parser, serve_command

    steering = parse_request({"rotserve_angle": 90.0, "rotserve_layers": window})
    assert list(_catalog().resolve(steering).layers) == layers
    # serve: its flag, then the checks every engine start makes (model config, plane), no engine
    # (`--layers=-2:`: argparse reads a separate "-2:" as an option.)
    command = serve_command(build_parser().parse_args([f"--layers={window}"]), [])
    overrides = json.loads(command.argv[command.argv.index("--hf-overrides") + 1])
    assert overrides["rotserve"]["layers"] == layers
    # extract: its config takes the window before any model loads (test_extract resolves it)
    ExtractConfig(layers=window).validate()
    assert parse_window(window, TOY_LAYERS) == layers


@pytest.mark.parametrize("window", ["1:2:3", "x", "0,9"])
def test_commands_and_requests_give_one_message_for_a_bad_window(window, tmp_path, capsys):
    from rotserve.extract.cli import main as extract
    from rotserve.serve import main as serve

    with pytest.raises(WindowError, match="^--layers") as expected:
        parse_window(window, TOY_LAYERS, "--layers")
    message = str(expected.value)
    assert serve([f"--layers={window}"]) == 2
    assert f"serve: error: {message}\n" in capsys.readouterr().err
    args = [f"--layers={window}", "--out", str(tmp_path / "p.safetensors"), "--quiet"]
    assert extract(args) == 2
    assert f"error: {message}\n" in capsys.readouterr().err
    # The request names its own field; the rest of the message is the same words.
    tail = message.removeprefix("--layers").lstrip(": ")
    with pytest.raises(RequestSteeringError, match=re.escape(tail)):
        _catalog().resolve(parse_request({"rotserve_angle": 90.0, "rotserve_layers": window}))


# -- token -> request mapping, tracker, rotation state -----------------------------------------


def test_token_slots_follow_query_start_loc():
    # Batch: a 3-token prefill, a 1-token decode, a request padded to 0 tokens, a 2-token
    # chunk; then 2 padding tokens. Slots are not batch positions (V2's idx_mapping).
    qsl = torch.tensor([0, 3, 4, 4, 6], dtype=torch.int32)
    slot_of_request = torch.tensor([7, 2, 5, 0])
    slots = token_slots(qsl, 8, identity_slot=9, slot_of_request=slot_of_request)
    assert slots.tolist() == [7, 7, 7, 2, 0, 0, 9, 9]
    # V1: the batch position is the slot.
    assert token_slots(qsl, 8, identity_slot=9).tolist() == [0, 0, 0, 1, 3, 3, 9, 9]
    # Explicit padding mask (V2 dummy batches are all padding).
    padding = torch.tensor([False] * 4 + [True] * 4)
    assert token_slots(qsl, 8, 9, slot_of_request, padding).tolist() == [7, 7, 7, 2] + [9] * 4
    assert token_slots(torch.tensor([0]), 3, 9).tolist() == [9, 9, 9]


def _basis(hidden: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b1, b2 = orthonormal_plane(torch.randn(hidden, generator=g), torch.randn(hidden, generator=g))
    return torch.stack([b1, b2])


def test_rotation_state_equals_rotate_per_token():
    basis = _basis()
    state = RotationState(basis, max_num_tokens=32)
    rows = RequestRows(capacity=4, device="cpu")
    steerings = [RequestSteering(90.0), RequestSteering(), RequestSteering(210.0, adaptive=True)]
    for slot, steering in enumerate(steerings):
        rows.set(slot, steering)
    qsl = torch.tensor([0, 5, 6, 9])  # 5 + 1 + 3 tokens, then 3 padding
    state.fill(rows, qsl, 12)
    h = torch.randn(12, 16)
    expected_table = angle_table(
        [90.0] * 5 + [None] + [210.0] * 3 + [None] * 3,
        adaptive=[False] * 6 + [True] * 3 + [False] * 3,
    )
    assert torch.equal(state.token_table[:12], expected_table)
    out = state(h)
    assert torch.equal(out, rotate(h, basis, expected_table))
    # Unsteered and padding tokens come back bit-identical.
    assert torch.equal(out[5], h[5]) and torch.equal(out[9:], h[9:])
    assert not torch.allclose(out[:5], h[:5])
    state.set_identity()
    assert torch.equal(state(h), h)


def test_engine_steering_checks_sites_against_the_architecture():
    s = EngineSteering.from_dict({"plane": "/p.safetensors", "sites": ["q_norm"]})
    with pytest.raises(RotServeConfigError, match="unknown steering site.*q_norm.*input_layernorm"):
        s.check(4, "RotServeQwen3ForCausalLM")
    EngineSteering.from_dict({"plane": "/p.safetensors", "layers": [3]}).check(4, "X")


def test_this_file_passes_without_vllm_installed():
    """Block `import vllm` in a fresh interpreter and run every other test of this file.

    Except the commands' tests: they check `rotserve serve` and `rotserve extract` (and would
    add ~10 s of transformers imports), not that the vocabulary runs without vLLM.
    """
    code = (
        "import sys; sys.modules['vllm'] = None; "  # `import vllm` now raises ImportError
        "import pytest; sys.exit(pytest.main(["
        f"{__file__!r}, '-q', '-p', 'no:cacheprovider', "
        "'-k', 'not without_vllm and not commands_and_requests']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
