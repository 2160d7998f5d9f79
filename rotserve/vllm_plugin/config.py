"""What a rotserve engine and each of its requests ask for, parsed and validated.

No vLLM import here: the same parsing runs in the frontend (to reject a bad request at
add-request time), in the worker (to build the per-request rows) and in `rotserve.engine`
(before anything crosses a process boundary), and must give the same answer in all three.

Engine settings (one plane per engine) travel inside the model's HF config, set through
vLLM's `hf_overrides`:

    hf_overrides={
        "architectures": ["RotServeQwen2ForCausalLM"],
        "rotserve": {"plane": "/abs/plane.safetensors", "layers": None, "sites": None},
    }

Why `hf_overrides` and not `additional_config`: the rotated architecture has to be selected
through `hf_overrides["architectures"]` anyway, so the plane rides in the same flag and one
`--hf-overrides '...'` fully describes a rotated model (no second flag to forget). The
`rotserve` entry becomes part of the HF config, which vLLM hashes into its compile-cache key
(measured on 0.32: changing the plane path, layers or sites changes the key), so a compiled
graph is never reused for other steering settings. The plane's numbers themselves are a
runtime buffer of the compiled graph, not a constant baked into it.

Per-request settings travel in `SamplingParams.extra_args`, in either of two forms:

    nested (Python API):   {"rotserve": {"angle": 210.0, "adaptive": True, "mode": "absolute"}}
    flat (HTTP vllm_xargs, which only carries str -> scalar):
                           {"rotserve_angle": 210.0, "rotserve_adaptive": True,
                            "rotserve_mode": "absolute"}

A request with no angle (no rotserve keys, or angle None) runs exactly as the stock model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The norms whose outputs are rotated by default: the normalised inputs of attention and MLP.
DEFAULT_SITES: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
SETTINGS_KEY = "rotserve"  # key inside hf_overrides / the HF config
SETTINGS_FIELDS = ("plane", "layers", "sites")

# The logits processor that validates requests and, on V1, tracks the batch layout.
TRACKER_FQCN = "rotserve.vllm_plugin:RotServeBatchTracker"

REQUEST_KEY = "rotserve"  # nested form: extra_args["rotserve"] = {...}
FLAT_PREFIX = "rotserve_"  # flat form: extra_args["rotserve_angle"] = ...
REQUEST_FIELDS = ("angle", "adaptive", "mode")
MODES = ("absolute", "relative")

# Stock vLLM architecture -> rotserve's rotated variant, registered by the plugin.
ROTATED_ARCHITECTURES: dict[str, str] = {
    "Qwen2ForCausalLM": "RotServeQwen2ForCausalLM",
    "LlamaForCausalLM": "RotServeLlamaForCausalLM",
    "MistralForCausalLM": "RotServeMistralForCausalLM",
    "Qwen3ForCausalLM": "RotServeQwen3ForCausalLM",
}


class RotServeConfigError(ValueError):
    """Engine-level settings that cannot work; the message says what to pass instead."""


class UnsupportedArchitectureError(RotServeConfigError):
    """The model's architecture has no rotated variant."""


class RequestSteeringError(ValueError):
    """A request's rotserve arguments are invalid (the engine rejects that request only)."""


def rotated_architecture(architecture: str) -> str:
    """The rotated variant's registered name for a stock architecture, or a clear error."""
    if architecture in ROTATED_ARCHITECTURES.values():
        return architecture
    try:
        return ROTATED_ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} has no rotated variant in rotserve; supported: "
            f"{', '.join(sorted(ROTATED_ARCHITECTURES))} (decoder layers with "
            f"input_layernorm and post_attention_layernorm RMSNorms)"
        ) from None


@dataclass(frozen=True)
class EngineSteering:
    """One engine's steering: the plane file and where it is applied."""

    plane: Path
    layers: tuple[int, ...] | None = None  # None = every decoder layer
    sites: tuple[str, ...] = DEFAULT_SITES

    @classmethod
    def from_hf_config(cls, hf_config: Any, architecture: str) -> EngineSteering:
        raw = getattr(hf_config, SETTINGS_KEY, None)
        if raw is None:
            raise RotServeConfigError(
                f"{architecture} needs a steering plane: pass hf_overrides="
                f'{{"architectures": ["{architecture}"], "rotserve": {{"plane": '
                f"\"/abs/path/plane.safetensors\"}}}} (CLI: --hf-overrides '...'), or use "
                f"rotserve.engine.RotServeEngine, which sets it for you"
            )
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> EngineSteering:
        if not isinstance(raw, Mapping):
            raise RotServeConfigError(
                f'hf_overrides["rotserve"] must be a mapping with keys {SETTINGS_FIELDS}, '
                f"got {type(raw).__name__}"
            )
        unknown = sorted(set(raw) - set(SETTINGS_FIELDS))
        if unknown:
            raise RotServeConfigError(
                f'unknown key(s) {unknown} in hf_overrides["rotserve"]; '
                f"allowed: {', '.join(SETTINGS_FIELDS)}"
            )
        plane = raw.get("plane")
        if not isinstance(plane, str | Path) or not str(plane):
            raise RotServeConfigError(
                'hf_overrides["rotserve"]["plane"] must be the path of a .safetensors plane '
                f"file, got {plane!r}"
            )
        return cls(
            plane=Path(plane).expanduser(),
            layers=_layers(raw.get("layers")),
            sites=_sites(raw.get("sites")),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for hf_overrides["rotserve"] (absolute plane path)."""
        return {
            "plane": str(self.plane.resolve()),
            "layers": list(self.layers) if self.layers is not None else None,
            "sites": list(self.sites),
        }

    def check(self, num_layers: int, architecture: str) -> None:
        """Layers in range and sites that every decoder layer of `architecture` steers."""
        self.chosen_layers(num_layers)
        unknown = [s for s in self.sites if s not in DEFAULT_SITES]
        if unknown:
            raise RotServeConfigError(
                f"unknown steering site(s) {unknown} for {architecture}; "
                f"choose from {', '.join(DEFAULT_SITES)}"
            )

    def chosen_layers(self, num_layers: int) -> list[int]:
        """Absolute, sorted layer indices (negative indices count from the end)."""
        if self.layers is None:
            return list(range(num_layers))
        chosen = set()
        for i in self.layers:
            if not -num_layers <= i < num_layers:
                raise RotServeConfigError(
                    f"layer {i} is out of range: the model has {num_layers} decoder layers "
                    f"(valid: 0..{num_layers - 1} or negative from the end)"
                )
            chosen.add(i % num_layers)
        return sorted(chosen)


def _layers(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not value
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    ):
        raise RotServeConfigError(
            f'hf_overrides["rotserve"]["layers"] must be null (all layers) or a non-empty list '
            f"of layer indices, got {value!r}"
        )
    return tuple(int(i) for i in value)


def _sites(value: Any) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_SITES
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or not value
        or not all(isinstance(s, str) and s for s in value)
    ):
        raise RotServeConfigError(
            f'hf_overrides["rotserve"]["sites"] must be null (default {list(DEFAULT_SITES)}) '
            f"or a non-empty list of norm module names, got {value!r}"
        )
    return tuple(dict.fromkeys(value))  # dedupe, keep order


@dataclass(frozen=True)
class RequestSteering:
    """One request's steering. angle None = unsteered (bit-identical to the stock model)."""

    angle: float | None = None
    adaptive: bool = False
    mode: str = "absolute"

    @property
    def active(self) -> bool:
        return self.angle is not None

    @property
    def relative(self) -> bool:
        return self.mode == "relative"

    def as_extra_args(self) -> dict[str, Any]:
        """Canonical nested form with plain Python scalars (safe to serialise)."""
        return {REQUEST_KEY: {"angle": self.angle, "adaptive": self.adaptive, "mode": self.mode}}

    def cache_salt(self, plane_id: str) -> str | None:
        """Prefix-cache salt: KV computed under one rotation must never serve another."""
        if self.angle is None:
            return None
        flag = "adaptive" if self.adaptive else "plain"
        return f"rotserve:{plane_id}:{self.mode}:{flag}:{self.angle!r}"


UNSTEERED = RequestSteering()


def parse_request(
    extra_args: Mapping[str, Any] | None, plain_types_only: bool = False
) -> RequestSteering:
    """Read a request's rotserve arguments from SamplingParams.extra_args (either form).

    Keys that do not start with "rotserve" belong to others and are ignored. Raises
    RequestSteeringError naming the offending key and value. numpy scalars are accepted and
    cast, unless plain_types_only: vLLM serialises extra_args between its processes and
    cannot encode numpy scalars (the request would fail later with an obscure error, and
    on vLLM 0.32 leave LLM.generate waiting for it forever), so its validator refuses them.
    """
    if not extra_args:
        return UNSTEERED
    if not isinstance(extra_args, Mapping):
        raise RequestSteeringError(f"extra_args must be a mapping, got {type(extra_args).__name__}")
    flat = {k[len(FLAT_PREFIX) :]: v for k, v in extra_args.items() if k.startswith(FLAT_PREFIX)}
    nested = extra_args.get(REQUEST_KEY)
    if nested is not None and flat:
        raise RequestSteeringError(
            f"give rotserve arguments either nested (extra_args['{REQUEST_KEY}']) or flat "
            f"({', '.join(FLAT_PREFIX + k for k in sorted(flat))}), not both"
        )
    if nested is None and not flat:
        return UNSTEERED
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise RequestSteeringError(
                f"extra_args['{REQUEST_KEY}'] must be a mapping with keys "
                f"{', '.join(REQUEST_FIELDS)}, got {type(nested).__name__} {nested!r}"
            )
        fields = dict(nested)

        def spell(key: str) -> str:
            return f"extra_args['{REQUEST_KEY}'][{key!r}]"
    else:
        fields = flat

        def spell(key: str) -> str:
            return FLAT_PREFIX + key

    unknown = sorted(set(fields) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestSteeringError(
            f"unknown rotserve argument(s) {', '.join(spell(k) for k in unknown)}; "
            f"allowed: {', '.join(spell(k) for k in REQUEST_FIELDS)}"
        )
    if plain_types_only:
        for key, value in fields.items():
            if type(value) not in (type(None), bool, int, float, str):
                raise RequestSteeringError(
                    f"{spell(key)} is a {type(value).__module__}.{type(value).__name__}; "
                    f"pass a plain Python value (e.g. float(angle)): vLLM cannot serialise it "
                    f"between processes (rotserve.engine.RotServeEngine casts for you)"
                )
    return RequestSteering(
        angle=_angle(fields.get("angle"), spell("angle")),
        adaptive=_flag(fields.get("adaptive", False), spell("adaptive")),
        mode=_mode(fields.get("mode", "absolute"), spell("mode")),
    )


def _angle(value: Any, name: str) -> float | None:
    if value is None:
        return None
    # bool is an int to Python, but True degrees is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestSteeringError(
            f"{name} must be a number of degrees (or null for no steering), "
            f"got {type(value).__name__} {value!r}"
        )
    angle = float(value)  # numpy scalars become plain floats here
    if not math.isfinite(angle):
        raise RequestSteeringError(f"{name} must be finite, got {angle!r}")
    return angle


def _flag(value: Any, name: str) -> bool:
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()  # numpy.bool_ is neither bool nor Integral
    # HTTP vllm_xargs turns JSON true into 1 (pydantic coerces bool to int there).
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(int(value))
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RequestSteeringError(f"{name} must be a boolean, got {type(value).__name__} {value!r}")


def _mode(value: Any, name: str) -> str:
    if value not in MODES:
        raise RequestSteeringError(f"{name} must be one of {', '.join(MODES)}, got {value!r}")
    return str(value)
