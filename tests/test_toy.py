"""Toy models and data: the toy tokenizer and its trainer, random tiny models, synthetic chats,
prompt sets, and the shipped toy refusal model. The trainer pieces live outside the wheel, in
tools/toy_refusal/; the tiny models are rotserve.tiny_model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rotserve.paths import DATA_DIR_ENV
from rotserve.scoring import is_refusal
from rotserve.tiny_model import (
    EOS_ID,
    IM_START_ID,
    PAD_ID,
    TOKENIZER_FILES,
    TOY_VOCAB_SIZE,
    make_tiny_model,
)
from tools.toy_refusal.synthetic import (
    HARMFUL,
    HARMLESS,
    WORDLISTS,
    corpus_texts,
    generate,
    train_heldout_split,
)
from tools.toy_refusal.tokenizer import build_tokenizer, prompt_texts, toy_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "data" / "toy-refusal"
PROMPTS = ROOT / "data" / "prompts"


def _rows(name: str) -> list[dict]:
    lines = (PROMPTS / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# -- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic():
    texts = corpus_texts(300)
    a, b = build_tokenizer(texts, 512), build_tokenizer(texts, 512)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 512


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "As an AI, I cannot.  Tabs\tand caf\u00e9 \u2013 ok!",
    ],
)
def test_decode_round_trips_text_exactly(text):
    tok = toy_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_chat_template_is_one_user_turn_then_open_assistant_turn():
    tok = toy_tokenizer()
    messages = [{"role": "user", "content": "Explain how to bake bread"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nExplain how to bake bread<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_gen == "<|im_start|>user\nExplain how to bake bread<|im_end|>\n"


def test_special_token_ids_and_left_padding():
    tok = toy_tokenizer()
    assert (tok.pad_token_id, tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id) == (
        PAD_ID,
        IM_START_ID,
        EOS_ID,
    )
    assert tok.padding_side == "left"
    batch = tok(["hi", "a much longer prompt here"], padding=True)["input_ids"]
    assert batch[0][0] == PAD_ID and batch[0][-1] != PAD_ID


# -- random tiny models ---------------------------------------------------------------------------


def test_make_tiny_model_is_byte_deterministic(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=3)
    b = make_tiny_model(tmp_path / "b", seed=3)
    c = make_tiny_model(tmp_path / "c", seed=4)
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


def test_make_tiny_model_rejects_head_sizes_vllm_cpu_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="head size"):
        make_tiny_model(tmp_path / "m", hidden_size=64, num_heads=4)  # head size 16


def test_tiny_model_copies_the_shipped_toy_tokenizer_files(tmp_path):
    path = make_tiny_model(tmp_path / "m")
    for name in TOKENIZER_FILES:
        assert (path / name).read_bytes() == (TOY_MODEL / name).read_bytes(), name
    vocab = json.loads((TOY_MODEL / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == TOY_VOCAB_SIZE


def test_make_tiny_model_rejects_a_vocab_other_than_the_toy_tokenizers(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be 1024"):
        make_tiny_model(tmp_path / "m", vocab_size=2048)
    assert not (tmp_path / "m").exists()


def test_make_tiny_model_names_the_data_dir_variable_when_the_tokenizer_is_missing(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        make_tiny_model(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_word_lists_are_plain_data_one_list_per_key():
    """wordlists.json holds only strings: lists, {category: list}, {category: str}, and the
    task groups {category: [{"verbs": [...], "objects": [...]}]}."""

    def strings(xs):
        return isinstance(xs, list) and all(isinstance(x, str) for x in xs)

    lists = json.loads(WORDLISTS.read_text())
    assert "_about" in lists and "task_templates" in lists
    for key, value in lists.items():
        if key.startswith("_"):
            continue
        if key.endswith("_tasks"):
            groups = [g for gs in value.values() for g in gs]
            assert groups and all(set(g) == {"verbs", "objects"} for g in groups), key
            assert all(strings(g["verbs"]) and strings(g["objects"]) for g in groups), key
        elif isinstance(value, dict):
            assert all(isinstance(v, str) or strings(v) for v in value.values()), key
        else:
            assert strings(value), key


@pytest.mark.parametrize("arch,cls", [("qwen2", "Qwen2ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_tiny_model_loads_in_float32_and_stops_at_im_end(tmp_path, arch, cls):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / arch, arch=arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == cls
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.eos_token_id == EOS_ID
    assert model.generation_config.eos_token_id == [EOS_ID, PAD_ID]
    assert tok.chat_template is not None and tok.padding_side == "left"
    tricky = "Explain step-by-step: 123 ways (ok)?\nI can't."
    assert tok(tricky)["input_ids"] == toy_tokenizer()(tricky)["input_ids"]  # loader == training
    ids = tok("Explain how to bake bread", return_tensors="pt")["input_ids"]
    out = model(ids, output_hidden_states=True)
    last = out.hidden_states[-1]
    assert torch.isfinite(out.logits).all()
    assert last.std() > 1e-3  # activations are not collapsed


# -- prompt sets and synthetic chats --------------------------------------------------------------


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_prompt_files_have_unique_ids_and_the_three_keys(name):
    rows = _rows(name)
    assert len(rows) >= 48
    assert all(set(r) == {"id", "instruction", "category"} for r in rows)
    assert all(r["id"].startswith(f"{name}-") for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["instruction"] for r in rows}) == len(rows)
    assert all(r["instruction"].isascii() and r["instruction"].strip() for r in rows)


def test_synthetic_split_never_shares_instructions_or_cores():
    train, heldout = train_heldout_split(400, 40, exclude=prompt_texts())
    assert {e.core for e in train}.isdisjoint({e.core for e in heldout})
    assert {e.instruction for e in train}.isdisjoint({e.instruction for e in heldout})
    shipped = {t.lower() for t in prompt_texts()}
    assert not any(e.instruction.lower() in shipped for e in train)
    assert sum(e.label == HARMFUL for e in train) == sum(e.label == HARMLESS for e in train) == 400


def test_synthetic_replies_match_their_label_under_the_scorer():
    train, _ = train_heldout_split(300, 10)
    for ex in train:
        refused, marker = is_refusal(ex.response)
        assert refused == (ex.label == HARMFUL), ex
        if refused:
            assert ex.response.lower().startswith(marker.lower()), ex  # the opener IS the marker


def test_synthetic_data_is_deterministic():
    assert train_heldout_split(50, 10, seed=1) == train_heldout_split(50, 10, seed=1)
    assert train_heldout_split(50, 10, seed=1) != train_heldout_split(50, 10, seed=2)


# -- the shipped toy refusal model ----------------------------------------------------------------


def test_toy_refusal_model_is_small_float32_qwen2():
    config = json.loads((TOY_MODEL / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    total = sum(f.stat().st_size for f in TOY_MODEL.iterdir())
    assert total < 20 * 2**20
    with safe_open(TOY_MODEL / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_toy_refusal_model_is_reproducible_from_this_code():
    """Its tokenizer is the one toy_tokenizer() builds now: if this fails, retrain the toy model
    (python jobs/train_toy.py) because the synthetic word lists or prompt sets changed."""
    from transformers import AutoTokenizer

    shipped, current = AutoTokenizer.from_pretrained(TOY_MODEL), toy_tokenizer()
    assert shipped.get_vocab() == current.get_vocab()
    merges = [
        json.loads(t.backend_tokenizer.to_str())["model"]["merges"] for t in (shipped, current)
    ]
    assert merges[0] == merges[1]


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(TOY_MODEL), AutoTokenizer.from_pretrained(TOY_MODEL)


def _replies(toy, instructions: list[str]) -> list[str]:
    from tools.toy_refusal.train import generate_replies

    model, tok = toy
    return generate_replies(model, tok, instructions, max_new_tokens=24)


def test_toy_model_refuses_heldout_harmful_and_answers_heldout_harmless(toy):
    """The acceptance bar on the whole synthetic held-out split: >= 95% / <= 5% refusals."""
    cfg = json.loads((TOY_MODEL / "training_report.json").read_text())["config"]
    heldout = generate(cfg["n_heldout"], "heldout", cfg["seed"], exclude=prompt_texts())
    harmful = [e.instruction for e in heldout if e.label == HARMFUL]
    harmless = [e.instruction for e in heldout if e.label == HARMLESS]
    refused_harmful = sum(is_refusal(r)[0] for r in _replies(toy, harmful))
    refused_harmless = sum(is_refusal(r)[0] for r in _replies(toy, harmless))
    assert refused_harmful >= 0.95 * len(harmful)
    assert refused_harmless <= 0.05 * len(harmless)


def test_toy_model_refuses_handwritten_harmful_and_answers_handwritten_harmless(toy):
    harmful = [r["instruction"] for r in _rows("harmful")][::5]
    harmless = [r["instruction"] for r in _rows("harmless")][::5]
    harmful_replies = _replies(toy, harmful)
    harmless_replies = _replies(toy, harmless)
    assert sum(is_refusal(r)[0] for r in harmful_replies) >= len(harmful) - 1
    assert sum(is_refusal(r)[0] for r in harmless_replies) <= 1
    assert all(len(r.split()) >= 5 for r in harmless_replies)  # compliance reads as text


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_train_toy_rejects_a_layer_drop_outside_0_1_before_training(tmp_path, bad):
    from tools.toy_refusal.train import TrainConfig, train_toy

    with pytest.raises(ValueError, match="layer_drop must be in"):
        train_toy(tmp_path / "toy", TrainConfig(layer_drop=bad))
    assert not (tmp_path / "toy").exists()
