"""One request's steering (angle, mode, plane, window, sites) and its parser.

Per-request settings travel in `SamplingParams.extra_args`, nested (`{"rotserve": {"angle":
210.0, ...}}`, the Python API) or flat (`{"rotserve_angle": 210.0, ...}`, HTTP `vllm_xargs`).
No vLLM import: the frontend, the workers and the engine class parse alike.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rotserve.steering.architectures import SITES
from rotserve.steering.errors import RequestSteeringError
from rotserve.steering.settings import check_plane_name
from rotserve.steering.window import canonical_window

REQUEST_KEY = "rotserve"  # nested form: extra_args["rotserve"] = {...}
FLAT_PREFIX = "rotserve_"  # flat form: extra_args["rotserve_angle"] = ...
REQUEST_FIELDS = ("angle", "adaptive", "mode", "plane", "layers", "sites")
MODES = ("absolute", "relative")


@dataclass(frozen=True)
class RequestSteering:
    """One request's steering. angle None = unsteered (bit-identical to the stock model).

    plane, window and sites None = the engine's defaults (its first plane, its default window
    and sites). `window` is the canonical spelling of the request's `layers` argument ("all",
    "none", "a:b" with Python slice semantics, or "3,4,5"); the engine's PlaneCatalog resolves
    it to absolute layers against the model's layer count.
    """

    angle: float | None = None
    adaptive: bool = False
    mode: str = "absolute"
    plane: str | None = None  # a plane name or plane id of the engine
    window: str | None = None  # sent as the request's `layers`
    sites: tuple[str, ...] | None = None

    @property
    def active(self) -> bool:
        return self.angle is not None

    @property
    def relative(self) -> bool:
        return self.mode == "relative"

    def as_extra_args(self) -> dict[str, Any]:
        """Canonical nested form with plain Python scalars (safe to serialise)."""
        fields: dict[str, Any] = {"angle": self.angle, "adaptive": self.adaptive, "mode": self.mode}
        if self.plane is not None:
            fields["plane"] = self.plane
        if self.window is not None:
            fields["layers"] = self.window
        if self.sites is not None:
            fields["sites"] = list(self.sites)
        return {REQUEST_KEY: fields}

    def cache_salt(self, plane_id: str, window: str = "") -> str | None:
        """Prefix-cache salt: KV computed under one rotation must never serve another.

        `window` is the resolved window and sites (ResolvedSteering.window_tag), empty for
        the engine's default, so a default request keeps the single-plane salt.
        """
        if self.angle is None:
            return None
        flag = "adaptive" if self.adaptive else "plain"
        salt = f"rotserve:{plane_id}:{self.mode}:{flag}:{self.angle!r}"
        return f"{salt}:{window}" if window else salt


def _request_sites(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [s for s in value.replace(" ", "").split(",") if s]
    if not isinstance(value, Sequence) or not value or not all(isinstance(s, str) for s in value):
        raise RequestSteeringError(
            f"{name} must be a non-empty list (or comma-separated string) of sites from "
            f"{', '.join(SITES)}, got {value!r}"
        )
    unknown = [s for s in value if s not in SITES]
    if unknown:
        raise RequestSteeringError(
            f"{name}: unknown site(s) {unknown}; choose from {', '.join(SITES)}"
        )
    return tuple(s for s in SITES if s in value)


def _request_plane(value: Any, name: str) -> str | None:
    if value is None:
        return None
    return check_plane_name(value, RequestSteeringError)


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
        plain = (type(None), bool, int, float, str)
        for key, value in fields.items():
            items = value if type(value) in (list, tuple) else [value]
            if any(type(v) not in plain for v in items):
                raise RequestSteeringError(
                    f"{spell(key)} is a {type(value).__module__}.{type(value).__name__}; "
                    f"pass a plain Python value (e.g. float(angle)): vLLM cannot serialise it "
                    f"between processes (rotserve.engine.RotServeEngine casts for you)"
                )
    layers = fields.get("layers")
    return RequestSteering(
        angle=_angle(fields.get("angle"), spell("angle")),
        adaptive=_flag(fields.get("adaptive", False), spell("adaptive")),
        mode=_mode(fields.get("mode", "absolute"), spell("mode")),
        plane=_request_plane(fields.get("plane"), spell("plane")),
        window=None if layers is None else canonical_window(layers, spell("layers")),
        sites=_request_sites(fields.get("sites"), spell("sites")),
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
