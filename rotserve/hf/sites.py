"""Where rotserve reads and steers inside a Hugging Face decoder model, by walking its modules.

Steering sites are the outputs of the two norms of every decoder layer (rotserve.steering's
SITES); the residual stream itself is never written. Extraction reads the residual stream at two
points per layer: resid_mid (after attention, the input of the pre-MLP norm) and resid_post.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from rotserve.steering import ARCHITECTURES, SITES, Architecture, architecture


@dataclass(frozen=True)
class LayerSites:
    """One decoder layer and its two norm modules."""

    index: int
    layer: nn.Module
    attn_norm: nn.Module  # output feeds attention (site "input_layernorm")
    mlp_norm: nn.Module  # output feeds the MLP; its input is resid_mid ("post_attention_layernorm")

    def norm(self, site: str) -> nn.Module:
        if site == SITES[0]:
            return self.attn_norm
        if site == SITES[1]:
            return self.mlp_norm
        raise ValueError(f"unknown steering site {site!r}; choose from {', '.join(SITES)}")


def architecture_of(model: Any) -> Architecture:
    """The table's entry for a loaded model (its config's name, else its class name)."""
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    name = archs[0]
    if name not in ARCHITECTURES and type(model).__name__ in ARCHITECTURES:
        name = type(model).__name__
    return architecture(name)  # UnsupportedArchitectureError, listing the table


def decoder_layers(model: nn.Module) -> list[LayerSites]:
    """The decoder layers of a supported causal LM, with their norm modules."""
    arch = architecture_of(model)
    layers: Any = model
    for attr in arch.layers_path.split("."):
        layers = getattr(layers, attr)
    return [
        LayerSites(i, layer, getattr(layer, arch.attn_norm), getattr(layer, arch.mlp_norm))
        for i, layer in enumerate(layers)
    ]
