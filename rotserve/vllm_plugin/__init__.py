"""rotserve's vLLM plugin: rotated model variants that steer each request by its own angle.

vLLM calls `register()` (entry point `vllm.general_plugins`) in every process it starts; the
tracker is resolved by name through `__getattr__` (see docs/DESIGN.md, "The vLLM plugin").
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from rotserve.steering import ROTATED_ARCHITECTURES

if TYPE_CHECKING:
    from vllm.config import ModelConfig

    from rotserve.vllm_plugin.tracker import RotServeBatchTracker

_MODELS_MODULE = "rotserve.vllm_plugin.models"

__all__ = ["RotServeBatchTracker", "register"]


def register() -> None:
    """vLLM general-plugin entry point: make the rotated architectures resolvable, each with
    its config hook (the tracker bound to the engine's planes, see `steering_config_hook`)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    supported = set(ModelRegistry.get_supported_archs())
    for name in ROTATED_ARCHITECTURES.values():
        if name not in supported:  # idempotent: vLLM may load plugins more than once
            # Lazy ("module:Class"): no model code is imported until an engine loads one.
            ModelRegistry.register_model(name, f"{_MODELS_MODULE}:{name}")
        # Keyed by the rotated names only, so no other model ever runs it.
        MODELS_CONFIG_MAP[name] = steering_config_hook()


@cache
def steering_config_hook() -> type:
    """vLLM's per-architecture config hook (an entry of MODELS_CONFIG_MAP) for the rotated
    models. vLLM runs it while it builds the engine's ModelConfig, in the frontend, before the
    config reaches any worker: there it binds the tracker to the engine's planes and layers, so
    a bad request is refused at admission whichever tracker the user listed."""
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class RotServeSteeringConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_model_config(model_config: ModelConfig) -> None:
            from rotserve.vllm_plugin.tracker import bind_tracker_to_engine

            bind_tracker_to_engine(model_config)

    return RotServeSteeringConfig


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
