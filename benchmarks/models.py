"""Benchmark models and planes: random-weight checkpoints built locally and cached.

Why random weights: the benchmarks time arithmetic, not answers, and must run without a
download. The shapes are those of real models, so every matmul, attention and norm costs what
it would on the real checkpoint. The one deliberate difference is the vocabulary: every tiny
model copies the toy tokenizer (rotserve.tiny_model, 1024 byte-level BPE tokens), and a model
whose vocab is larger than its tokenizer samples ids the detokenizer cannot decode (random
weights pick every id), so the vocab is the tokenizer's. Qwen2.5-0.5B's real lm_head
(151936 x 896) would add ~136M multiply-adds per generated token that neither contender steers,
so this model makes the rotation's relative overhead look larger, not smaller.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """A decoder shape; `name` says which real model it mimics."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 1024  # rotserve.tiny_model.TOY_VOCAB_SIZE: tiny models must match it
    arch: str = "qwen2"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linear_weights(self) -> int:
        """Weights of every linear layer (q, k, v, o, gate, up, down) and the LM head: the
        multiply-adds one token costs, which is what the roofline counts."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size
        return self.num_layers * per_layer + self.vocab_size * h

    def parameters(self) -> int:
        """Parameter count (untied embeddings, Qwen2 q/k/v biases, norms)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        biases_and_norms = self.num_layers * (h + 2 * kv + 2 * h) + h
        return self.linear_weights() + self.vocab_size * h + biases_and_norms

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "head_dim": self.head_dim, "parameters": self.parameters()}


# Qwen2.5-0.5B-Instruct: hidden 896, 24 layers, 14 heads, 2 KV heads (head size 64), MLP 4864.
QWEN25_05B = ModelShape("qwen2.5-0.5b-shaped", 896, 24, 14, 2, 4864)
# A quarter-depth, narrower stand-in for the HF side of the grid in --quick (HF generate with
# hooks on the 0.5B shape takes minutes for a 36-angle grid on 2 cores).
SMALL = ModelShape("small-qwen2", 512, 8, 8, 2, 1536)
# For the test suite's smoke test only.
TINY = ModelShape("tiny-qwen2", 128, 2, 4, 2, 256)

PLANE_SEED = 1234


def model_dir(shape: ModelShape, root: Path) -> Path:
    """Build (once) and return the checkpoint directory for shape under root.

    A stamp file records the shape, so a changed shape rebuilds instead of silently reusing
    a stale checkpoint.
    """
    from rotserve.tiny_model import make_tiny_model

    out = root / shape.name
    stamp = out / "rotserve_bench_shape.json"
    wanted = json.dumps(shape.as_dict(), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return out
    make_tiny_model(
        out,
        arch=shape.arch,
        seed=0,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
    )
    _check_vocab(out, shape)
    stamp.write_text(wanted)
    return out


def _check_vocab(path: Path, shape: ModelShape) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if len(tok) != shape.vocab_size:
        raise RuntimeError(
            f"{shape.name}: tokenizer has {len(tok)} tokens but the model's vocab is "
            f"{shape.vocab_size}; random weights would sample undecodable ids"
        )


def plane_file(shape: ModelShape, root: Path) -> Path:
    """A seeded random orthonormal plane for shape (what it steers toward does not matter
    for timing; every token is rotated either way)."""
    from rotserve.plane import random_plane

    path = root / f"{shape.name}.plane.safetensors"
    if path.is_file():
        return path
    return random_plane(shape.hidden_size, PLANE_SEED, model=shape.name).save(path)
