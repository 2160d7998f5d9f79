"""The hook-based reference generator: the oracle the vLLM plugin is held to."""

import pytest
import torch

from rotserve.hf import HFRotatedGenerator, decoder_layers
from rotserve.plane import PlaneError, load_plane
from rotserve.prompts import chat_prompts
from rotserve.steering import UnsupportedArchitectureError

INSTRUCTIONS = [
    "Write a poem about tea.",
    "Explain how tides work.",
    "Give me three tips for a job interview and explain each one.",
    "Plan a weekend in the mountains.",
]


@pytest.fixture(scope="module")
def gen(tiny_qwen2, tiny_plane):
    return HFRotatedGenerator(tiny_qwen2, tiny_plane, dtype="float32")


@pytest.fixture(scope="module")
def prompts(gen):
    return chat_prompts(gen.tokenizer, INSTRUCTIONS)


def test_no_angle_is_the_unhooked_model(gen, prompts):
    steered = gen.generate(prompts, [None] * 4, max_new_tokens=12)
    enc = gen.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    plain = gen.model.generate(
        **enc, max_new_tokens=12, do_sample=False, pad_token_id=gen.tokenizer.pad_token_id
    )
    for g, row in zip(steered, plain[:, enc["input_ids"].shape[1] :], strict=True):
        assert list(g.token_ids) == row.tolist()[: len(g.token_ids)]


def test_a_batch_mixing_angles_equals_each_prompt_alone(gen, prompts):
    angles = [0.0, None, 210.0, 300.0]
    adaptive = [False, False, True, False]
    batched = gen.generate(prompts, angles, adaptive=adaptive, max_new_tokens=16)
    for i in range(4):
        alone = gen.generate(
            prompts[i : i + 1], angles[i : i + 1], adaptive=adaptive[i], max_new_tokens=16
        )
        assert batched[i].token_ids == alone[0].token_ids, f"row {i} (angle {angles[i]})"
        assert batched[i].logprobs == pytest.approx(alone[0].logprobs, abs=1e-4)


def test_rotation_changes_what_the_model_says(gen, prompts):
    outs = {a: gen.generate(prompts[:2], [a, a], max_new_tokens=12) for a in (None, 0.0, 180.0)}
    assert (
        outs[0.0][0].token_ids != outs[180.0][0].token_ids
        or outs[0.0][1].token_ids != outs[180.0][1].token_ids
    )
    assert (
        outs[None][0].token_ids != outs[0.0][0].token_ids
        or outs[None][1].token_ids != outs[0.0][1].token_ids
    )


def test_hooks_are_removed_after_generation(gen, prompts):
    gen.generate(prompts[:1], [90.0], max_new_tokens=2)
    for layer in decoder_layers(gen.model):
        assert not layer.attn_norm._forward_hooks and not layer.mlp_norm._forward_hooks


def test_seeded_sampling_is_reproducible(gen, prompts):
    a = gen.generate(prompts[:2], [45.0, None], max_new_tokens=10, temperature=1.0, seed=3)
    b = gen.generate(prompts[:2], [45.0, None], max_new_tokens=10, temperature=1.0, seed=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_a_plane_for_another_model_is_refused(tiny_qwen2, tmp_path):
    from rotserve.plane import Plane, orthonormal_plane

    path = Plane(*orthonormal_plane(torch.randn(64), torch.randn(64))).save(
        tmp_path / "p.safetensors"
    )
    with pytest.raises(PlaneError, match="hidden size 64 but .* has 128"):
        HFRotatedGenerator(tiny_qwen2, load_plane(path))


def test_llama_layout_is_supported_and_unknown_architectures_are_named(tiny_llama):
    assert len(decoder_layers(HFRotatedGenerator(tiny_llama, None).model)) == 2

    class Fake(torch.nn.Module):
        config = type("C", (), {"architectures": ["GPTBigCodeForCausalLM"]})()

    with pytest.raises(UnsupportedArchitectureError, match="Qwen2ForCausalLM"):
        decoder_layers(Fake())
