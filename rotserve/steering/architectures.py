"""The model architectures rotserve knows, in one table, and the names of the steered norms.

Extraction and the HF reference generator read every architecture in the table; the vLLM
plugin steers those with a rotated variant (`RotServe<Arch>ForCausalLM`) and refuses the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from rotserve.steering.errors import RotServeConfigError

# rotserve's names for the two steered norms: the one whose output feeds attention and the one
# whose output feeds the MLP. They are the module names in vLLM's decoder layers and in HF's
# Llama-family layers; the table below maps them onto each HF layout.
SITES: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")


class UnsupportedArchitectureError(RotServeConfigError):
    """The model's architecture is not in rotserve's table, or has no rotated vLLM variant."""


@dataclass(frozen=True)
class Architecture:
    """One decoder-only layout: where its layers are and what its two steered norms are called."""

    name: str  # the HF config's architectures[0], e.g. "Qwen2ForCausalLM"
    layers_path: str  # attribute path from the HF model to its list of decoder layers
    attn_norm: str  # HF module of site "input_layernorm" (its output feeds attention)
    mlp_norm: str  # HF module of site "post_attention_layernorm" (its output feeds the MLP)
    rotated: str | None  # the vLLM plugin's variant; None: extraction and HF reading only


_LLAMA_LIKE = ("model.layers", "input_layernorm", "post_attention_layernorm")

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("Qwen2ForCausalLM", *_LLAMA_LIKE, rotated="RotServeQwen2ForCausalLM"),
        Architecture("Qwen3ForCausalLM", *_LLAMA_LIKE, rotated="RotServeQwen3ForCausalLM"),
        Architecture("LlamaForCausalLM", *_LLAMA_LIKE, rotated="RotServeLlamaForCausalLM"),
        Architecture("MistralForCausalLM", *_LLAMA_LIKE, rotated="RotServeMistralForCausalLM"),
        # Gemma2's post_attention_layernorm normalises the attention output before the residual
        # add; the MLP's input norm is pre_feedforward_layernorm.
        Architecture(
            "Gemma2ForCausalLM",
            "model.layers",
            "input_layernorm",
            "pre_feedforward_layernorm",
            rotated=None,
        ),
    )
}

# Stock vLLM architecture -> rotserve's rotated variant, registered by the plugin.
ROTATED_ARCHITECTURES: dict[str, str] = {
    a.name: a.rotated for a in ARCHITECTURES.values() if a.rotated is not None
}


def architecture(name: str) -> Architecture:
    """The table's entry for a stock architecture name, or an error listing the table."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; rotserve reads "
            f"{', '.join(sorted(ARCHITECTURES))}. A decoder whose layers have a norm before "
            f"attention and one before the MLP is one entry in "
            f"rotserve.steering.architectures.ARCHITECTURES"
        ) from None


def rotated_architecture(name: str) -> str:
    """The rotated variant's registered name for a stock architecture, or a clear error."""
    if name in ROTATED_ARCHITECTURES.values():
        return name
    try:
        return ROTATED_ARCHITECTURES[name]
    except KeyError:
        readable = (
            " (extraction and the HF reference generator read it)" if name in ARCHITECTURES else ""
        )
        raise UnsupportedArchitectureError(
            f"architecture {name!r} has no rotated variant in rotserve{readable}; supported: "
            f"{', '.join(sorted(ROTATED_ARCHITECTURES))} (decoder layers with "
            f"input_layernorm and post_attention_layernorm RMSNorms)"
        ) from None
