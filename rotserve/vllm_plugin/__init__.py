"""rotserve's vLLM plugin: per-request rotation angles inside one continuous batch.

vLLM calls `register()` (entry point `vllm.general_plugins` -> `rotserve`) in every process
it starts: the frontend, the engine core, every worker and Ray actor. Registering from the
driver alone would reach none of the workers. Registration is lazy ("module:Class" strings),
so no model code is imported until an engine actually loads a rotated architecture.

Using it (one plane per engine, one angle per request):

    llm = vllm.LLM(
        model,
        hf_overrides={
            "architectures": ["RotServeQwen2ForCausalLM"],
            "rotserve": {"plane": "/abs/plane.safetensors", "layers": None, "sites": None},
        },
        logits_processors=["rotserve.vllm_plugin:RotServeBatchTracker"],
    )
    llm.generate(prompt, SamplingParams(extra_args={"rotserve": {"angle": 210.0}}))

or `vllm serve MODEL --hf-overrides '{...}' --logits-processors
rotserve.vllm_plugin:RotServeBatchTracker` and, per request over HTTP,
`extra_body={"vllm_xargs": {"rotserve_angle": 210, "rotserve_adaptive": true}}`.
`rotserve.engine.RotServeEngine` wraps all of this (and per-angle prefix-cache salts).
See rotserve.vllm_plugin.config for every key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rotserve.vllm_plugin.config import (
    ROTATED_ARCHITECTURES,
    TRACKER_FQCN,
    EngineSteering,
    RequestSteering,
    RequestSteeringError,
    RotServeConfigError,
    UnsupportedArchitectureError,
    parse_request,
    rotated_architecture,
)

if TYPE_CHECKING:
    from rotserve.vllm_plugin.tracker import RotServeBatchTracker

_MODELS_MODULE = "rotserve.vllm_plugin.models"

__all__ = [
    "ROTATED_ARCHITECTURES",
    "TRACKER_FQCN",
    "EngineSteering",
    "RequestSteering",
    "RequestSteeringError",
    "RotServeBatchTracker",
    "RotServeConfigError",
    "UnsupportedArchitectureError",
    "parse_request",
    "register",
    "rotated_architecture",
]


def register() -> None:
    """vLLM general-plugin entry point: make the rotated architectures resolvable."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for name in ROTATED_ARCHITECTURES.values():
        if name not in supported:  # idempotent: vLLM may load plugins more than once
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
