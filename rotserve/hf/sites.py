"""Where rotserve reads and steers inside a Hugging Face decoder model.

Steering sites are the outputs of the two norms of every decoder layer (the normalised inputs
of attention and of the MLP); the residual stream itself is never written. Extraction reads
the residual stream at two points per layer: resid_mid (after attention, the input of the
pre-MLP norm) and resid_post (the block output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from rotserve.vllm_plugin.config import DEFAULT_SITES

# Architecture -> (attribute path to the layer list, pre-attention norm, pre-MLP norm).
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "Qwen2ForCausalLM": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "Qwen3ForCausalLM": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "LlamaForCausalLM": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "MistralForCausalLM": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "Gemma2ForCausalLM": ("model.layers", "input_layernorm", "pre_feedforward_layernorm"),
}
# rotserve's names for the two steered norms, the same on the HF side as in the vLLM plugin.
STEER_SITES = DEFAULT_SITES


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class LayerSites:
    """One decoder layer and its two norm modules."""

    index: int
    layer: nn.Module
    attn_norm: nn.Module  # output feeds attention    ("input_layernorm")
    mlp_norm: nn.Module  # output feeds the MLP; its input is resid_mid ("post_attention_layernorm")

    def norm(self, site: str) -> nn.Module:
        if site == "input_layernorm":
            return self.attn_norm
        if site == "post_attention_layernorm":
            return self.mlp_norm
        raise ValueError(f"unknown steering site {site!r}; choose from {', '.join(STEER_SITES)}")


def architecture_of(model: Any) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    arch = archs[0]
    if arch not in ARCHITECTURES and type(model).__name__ in ARCHITECTURES:
        arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; rotserve knows "
            f"{', '.join(sorted(ARCHITECTURES))}. Llama-family layouts with input_layernorm and "
            f"post_attention_layernorm per layer can be added to rotserve.hf.sites.ARCHITECTURES"
        )
    return arch


def decoder_layers(model: nn.Module) -> list[LayerSites]:
    """The decoder layers of a supported causal LM, with their norm modules."""
    path, attn_name, mlp_name = ARCHITECTURES[architecture_of(model)]
    layers: Any = model
    for attr in path.split("."):
        layers = getattr(layers, attr)
    return [
        LayerSites(i, layer, getattr(layer, attn_name), getattr(layer, mlp_name))
        for i, layer in enumerate(layers)
    ]


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """'a:b' (python slice, negatives allowed), 'a,b,c' or None (all) -> sorted layer indices."""
    if spec is None or spec in ("", "all"):
        return list(range(num_layers))
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 2:
            raise ValueError(f"layer window {spec!r} must look like 'a:b'")
        a, b = (int(p) if p else None for p in parts)
        chosen = list(range(num_layers))[slice(a, b)]
    else:
        chosen = sorted({int(x) for x in spec.split(",")})
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad or not chosen:
        raise ValueError(f"layers {spec!r} select nothing valid in a {num_layers}-layer model")
    return chosen
