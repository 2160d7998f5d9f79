"""rotserve's vLLM plugin: rotated model variants that steer each request by its own angle.

vLLM calls `register()` (entry point `vllm.general_plugins`) in every process it starts; the
tracker is resolved by name through `__getattr__` (see docs/DESIGN.md, "The vLLM plugin").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rotserve.steering import ROTATED_ARCHITECTURES

if TYPE_CHECKING:
    from rotserve.vllm_plugin.tracker import RotServeBatchTracker

_MODELS_MODULE = "rotserve.vllm_plugin.models"

__all__ = ["RotServeBatchTracker", "register"]


def register() -> None:
    """vLLM general-plugin entry point: make the rotated architectures resolvable."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for name in ROTATED_ARCHITECTURES.values():
        if name not in supported:  # idempotent: vLLM may load plugins more than once
            # Lazy ("module:Class"): no model code is imported until an engine loads one.
            ModelRegistry.register_model(name, f"{_MODELS_MODULE}:{name}")


def __getattr__(name: str) -> Any:
    # The tracker imports torch and vLLM internals; only load it when asked for (vLLM
    # resolves "rotserve.vllm_plugin:RotServeBatchTracker" through this).
    if name == "RotServeBatchTracker":
        from rotserve.vllm_plugin.tracker import RotServeBatchTracker

        return RotServeBatchTracker
    if name.startswith("RotServeBatchTracker__"):  # the tracker bound to an engine's catalog
        from rotserve.vllm_plugin.tracker import bound_tracker

        return bound_tracker(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
