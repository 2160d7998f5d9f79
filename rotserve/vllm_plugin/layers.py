"""The steered norm: an RMSNorm whose normalised output is rotated in the plane.

vLLM's decoder layers (Qwen2, Llama, Mistral, Qwen3) call their norms as `norm(x)` on the
first layer and `norm(x, residual)` afterwards (fused add + RMSNorm returning
`(normed, residual)`). Rotating inside the norm module, on `normed` only, steers exactly what
feeds attention and the MLP and leaves the residual stream untouched, without rewriting any
decoder layer's forward. Parameter names stay those of the checkpoint (`...layernorm.weight`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from vllm.model_executor.layers.layernorm import RMSNorm

from rotserve.steering import RotServeConfigError
from rotserve.steering.table import RotationState


class RotatedRMSNorm(RMSNorm):
    """RMSNorm followed by the per-token rotation of its normalised output."""

    def __init__(self, like: RMSNorm, rotation: RotationState, gate: int | None = None) -> None:
        super().__init__(
            like.hidden_size,
            eps=like.variance_epsilon,
            var_hidden_size=like.variance_size_override,
            has_weight=like.has_weight,
            dtype=like.weight.dtype,
        )
        # One RotationState shared by every steered norm: one table write per step. `gate`
        # is this norm's gate column (a Python int, constant to the compiled graph).
        self.rotation = rotation
        self.gate = gate

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Branching on `residual is None` is fixed per call site (first layer or not), exactly
        # like the stock layers do; nothing here depends on tensor values.
        if residual is None:
            return self.rotation(super().forward(x), self.gate)
        normed, residual = super().forward(x, residual)
        return self.rotation(normed, self.gate), residual

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rotated (gate {self.gate})"


def install_rotation(
    layers: Iterable[nn.Module],
    rotation: RotationState,
    steerable: Sequence[tuple[int, str]],
) -> list[str]:
    """Swap the norm of every steerable (layer, site) for RotatedRMSNorm, in place; the
    norm's gate column is its position in `steerable` (PlaneCatalog.steerable's order).

    `layers` is the model's full layer list (pipeline-parallel placeholders included, they
    are skipped). Returns the steered module names, e.g. "layers.3.input_layernorm".
    """
    layers = list(layers)
    steered = []
    for gate, (index, site) in enumerate(steerable):
        layer = layers[index]
        if not _is_decoder_layer(layer):
            continue
        norm = getattr(layer, site, None)
        if not isinstance(norm, RMSNorm):
            available = sorted(name for name, m in layer.named_children() if isinstance(m, RMSNorm))
            raise RotServeConfigError(
                f"steering site {site!r} is not an RMSNorm of {type(layer).__name__} "
                f"(layer {index}); available norm sites: {', '.join(available)}"
            )
        if isinstance(norm, RotatedRMSNorm):
            continue
        setattr(layer, site, RotatedRMSNorm(norm, rotation, gate))
        steered.append(f"layers.{index}.{site}")
    return steered


def _is_decoder_layer(layer: nn.Module) -> bool:
    # make_layers fills the layers owned by other pipeline stages with PPMissingLayer.
    return type(layer).__name__ != "PPMissingLayer"
