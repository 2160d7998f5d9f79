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

import base64
import json
import math
import numbers
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The norms whose outputs are rotated by default: the normalised inputs of attention and MLP.
DEFAULT_SITES: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
SETTINGS_KEY = "rotserve"  # key inside hf_overrides / the HF config
SETTINGS_FIELDS = ("plane", "planes", "max_planes", "layers", "sites", "steerable")
# Plane names ride in request arguments, cache salts and the tracker's class name (see
# PlaneCatalog.tracker_fqcn), so they are kept to characters all three carry unchanged.
PLANE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")

# The logits processor that validates requests and, on V1, tracks the batch layout.
TRACKER_FQCN = "rotserve.vllm_plugin:RotServeBatchTracker"

REQUEST_KEY = "rotserve"  # nested form: extra_args["rotserve"] = {...}
FLAT_PREFIX = "rotserve_"  # flat form: extra_args["rotserve_angle"] = ...
REQUEST_FIELDS = ("angle", "adaptive", "mode", "plane", "layers", "sites")
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
    """One engine's steering: its planes (name -> file, in slot order), the default window and
    sites of a request that names none, and the steerable set where norms are rotated.

    Two spellings in hf_overrides["rotserve"]: the single-plane form {"plane": PATH, ...}
    (its plane is named "default") and {"planes": {NAME: PATH, ...}, "max_planes": K, ...}.
    `steerable` ({"layers": [...] | null, "sites": [...] | null}) is where RotatedRMSNorm is
    installed; every request's window and sites must lie inside it. Default: every layer x
    both default sites, so a request may steer any window.
    """

    planes: tuple[tuple[str, Path], ...]
    layers: tuple[int, ...] | None = None  # default window; None = every decoder layer
    sites: tuple[str, ...] = DEFAULT_SITES  # default sites
    max_planes: int | None = None  # plane slots; None = as many as planes
    steerable_layers: tuple[int, ...] | None = None  # None = every decoder layer
    steerable_sites: tuple[str, ...] = DEFAULT_SITES

    @property
    def plane(self) -> Path:
        """The default plane's file (the first one): what a request naming no plane steers."""
        return self.planes[0][1]

    @property
    def plane_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.planes)

    @property
    def slots(self) -> int:
        return self.max_planes if self.max_planes is not None else len(self.planes)

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
        planes = _planes(raw.get("plane"), raw.get("planes"))
        max_planes = raw.get("max_planes")
        if max_planes is not None and (
            isinstance(max_planes, bool)
            or not isinstance(max_planes, int)
            or max_planes < len(planes)
        ):
            raise RotServeConfigError(
                f'hf_overrides["rotserve"]["max_planes"] must be an integer >= the number of '
                f"planes ({len(planes)}), got {max_planes!r}"
            )
        steerable = raw.get("steerable") or {}
        if not isinstance(steerable, Mapping) or set(steerable) - {"layers", "sites"}:
            raise RotServeConfigError(
                'hf_overrides["rotserve"]["steerable"] must be {"layers": [...] or null, '
                f'"sites": [...] or null}}, got {steerable!r}'
            )
        return cls(
            planes=planes,
            layers=_layers(raw.get("layers")),
            sites=_sites(raw.get("sites")),
            max_planes=max_planes,
            steerable_layers=_layers(steerable.get("layers")),
            steerable_sites=_sites(steerable.get("sites")),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for hf_overrides["rotserve"] (absolute plane paths).

        One plane named "default" with no extra slots keeps the single-plane spelling, so
        the HF config (and vLLM's compile-cache key) of existing set-ups does not change.
        """
        out: dict[str, Any] = {}
        if self.plane_names == (DEFAULT_PLANE,) and self.max_planes is None:
            out["plane"] = str(self.plane.resolve())
        else:
            out["planes"] = {name: str(path.resolve()) for name, path in self.planes}
            if self.max_planes is not None:
                out["max_planes"] = self.max_planes
        out["layers"] = list(self.layers) if self.layers is not None else None
        out["sites"] = list(self.sites)
        if self.steerable_layers is not None or self.steerable_sites != DEFAULT_SITES:
            out["steerable"] = {
                "layers": list(self.steerable_layers)
                if self.steerable_layers is not None
                else None,
                "sites": list(self.steerable_sites),
            }
        return out

    def check(self, num_layers: int, architecture: str) -> None:
        """Layers in range and sites that every decoder layer of `architecture` steers."""
        self.chosen_layers(num_layers)
        self.steerable(num_layers)
        unknown = [s for s in (*self.sites, *self.steerable_sites) if s not in DEFAULT_SITES]
        if unknown:
            raise RotServeConfigError(
                f"unknown steering site(s) {unknown} for {architecture}; "
                f"choose from {', '.join(DEFAULT_SITES)}"
            )

    def chosen_layers(self, num_layers: int) -> list[int]:
        """The default window: absolute, sorted layer indices (negatives count from the end)."""
        return _absolute_layers(self.layers, num_layers, RotServeConfigError)

    def steerable(self, num_layers: int) -> tuple[tuple[int, str], ...]:
        """(layer, site) of every rotated norm, in gate-column order (layer-major).

        The union of the steerable set and the default window x default sites, so the
        default request always fits.
        """
        layers = set(_absolute_layers(self.steerable_layers, num_layers, RotServeConfigError))
        layers |= set(self.chosen_layers(num_layers))
        sites = [s for s in DEFAULT_SITES if s in (*self.steerable_sites, *self.sites)]
        sites += [s for s in dict.fromkeys((*self.steerable_sites, *self.sites)) if s not in sites]
        return tuple((layer, site) for layer in sorted(layers) for site in sites)


DEFAULT_PLANE = "default"  # the name of the single-plane form's plane


def _planes(plane: Any, planes: Any) -> tuple[tuple[str, Path], ...]:
    if (plane is None) == (planes is None):
        raise RotServeConfigError(
            'hf_overrides["rotserve"] needs exactly one of "plane" (the path of a '
            '.safetensors plane file) or "planes" ({name: path, ...}), got '
            f"plane={plane!r}, planes={planes!r}"
        )
    if plane is not None:
        planes = {DEFAULT_PLANE: plane}
    if not isinstance(planes, Mapping) or not planes:
        raise RotServeConfigError(
            'hf_overrides["rotserve"]["planes"] must be a non-empty mapping name -> path of a '
            f".safetensors plane file, got {planes!r}"
        )
    out = []
    for name, path in planes.items():
        check_plane_name(name, RotServeConfigError)
        if not isinstance(path, str | Path) or not str(path):
            raise RotServeConfigError(
                f'hf_overrides["rotserve"]["plane"] must be the path of a .safetensors plane '
                f"file, got {path!r} (plane {name!r})"
            )
        out.append((name, Path(path).expanduser()))
    return tuple(out)


def check_plane_name(name: Any, error: type[ValueError] = RotServeConfigError) -> str:
    """A plane name: 1-32 characters of [A-Za-z0-9_-]; raise `error` otherwise."""
    if not isinstance(name, str) or not 0 < len(name) <= 32 or set(name) - PLANE_NAME_CHARS:
        raise error(
            f"plane name {name!r} must be 1-32 characters of letters, digits, '_' and '-' "
            f"(it travels in request arguments and cache salts)"
        )
    return name


def _absolute_layers(
    layers: Sequence[int] | None, num_layers: int, error: type[ValueError]
) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    chosen = set()
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise error(
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
    """One request's steering. angle None = unsteered (bit-identical to the stock model).

    plane, layers and sites None = the engine's defaults (its first plane, its default window
    and sites). `layers` is kept as the canonical spelling of the window ("all", "none",
    "a:b" with Python slice semantics, or "3,4,5"); the engine's PlaneCatalog resolves it
    against the model's layer count.
    """

    angle: float | None = None
    adaptive: bool = False
    mode: str = "absolute"
    plane: str | None = None  # a plane name or plane id of the engine
    layers: str | None = None
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
        if self.layers is not None:
            fields["layers"] = self.layers
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


@dataclass(frozen=True)
class ResolvedSteering:
    """A request's steering against one engine: plane slot and the gate of every steered norm."""

    steering: RequestSteering
    plane: int  # slot index in the engine's planes
    plane_id: str
    layers: tuple[int, ...]  # absolute, sorted
    sites: tuple[str, ...]
    gates: tuple[bool, ...]  # one per PlaneCatalog.steerable entry
    window_tag: str  # "" for the engine's default window and sites, else "L<ranges>S<sites>"

    def cache_salt(self) -> str | None:
        return self.steering.cache_salt(self.plane_id, self.window_tag)


@dataclass(frozen=True)
class PlaneCatalog:
    """What a request may name on one engine: its planes and its steerable (layer, site)s.

    Built by the worker from the loaded planes and by the set-up path before the engine
    starts; it also rides in the tracker's class name (tracker_fqcn) so vLLM's frontend,
    which gives a logits processor's validate_params nothing but the request, can refuse an
    unknown plane or an out-of-range layer with a 400 before it reaches a worker.
    """

    names: tuple[str, ...]
    ids: tuple[str, ...]
    num_layers: int
    steerable: tuple[tuple[int, str], ...]
    default_layers: tuple[int, ...]
    default_sites: tuple[str, ...]
    slots: int

    @classmethod
    def build(
        cls, settings: EngineSteering, plane_ids: Sequence[str], num_layers: int
    ) -> PlaneCatalog:
        if len(plane_ids) != len(settings.planes):
            raise ValueError(f"{len(plane_ids)} plane ids for {len(settings.planes)} planes")
        return cls(
            names=settings.plane_names,
            ids=tuple(plane_ids),
            num_layers=num_layers,
            steerable=settings.steerable(num_layers),
            default_layers=tuple(settings.chosen_layers(num_layers)),
            default_sites=settings.sites,
            slots=settings.slots,
        )

    def plane_index(self, ref: str | None) -> int:
        if ref is None:
            return 0
        for index, (name, plane_id) in enumerate(zip(self.names, self.ids, strict=True)):
            if ref in (name, plane_id):
                return index
        raise RequestSteeringError(
            f"unknown plane {ref!r}: this engine has "
            + ", ".join(f"{n} (id {i})" for n, i in zip(self.names, self.ids, strict=True))
        )

    def resolve(self, steering: RequestSteering) -> ResolvedSteering:
        """The plane slot and gates of one request; RequestSteeringError naming what is wrong."""
        index = self.plane_index(steering.plane)
        if steering.layers is None:
            layers = self.default_layers
        else:
            layers = tuple(window_layers(steering.layers, self.num_layers))
        sites = self.default_sites if steering.sites is None else steering.sites
        wanted = {(layer, site) for layer in layers for site in sites}
        missing = sorted(wanted - set(self.steerable))
        if missing:
            layer, site = missing[0]
            steerable_layers = sorted({la for la, _ in self.steerable})
            raise RequestSteeringError(
                f"layer {layer} site {site} is not steerable on this engine "
                f"({len(missing)} such (layer, site) pairs); steerable layers: "
                f"{_ranges(steerable_layers) or 'none'}, sites: "
                f"{', '.join(dict.fromkeys(s for _, s in self.steerable))} (start the engine "
                f"with a wider steerable set)"
            )
        default = layers == self.default_layers and tuple(sites) == self.default_sites
        tag = (
            ""
            if default
            else f"L{_ranges(layers) or 'none'}S"
            + "".join(str(DEFAULT_SITES.index(s)) for s in sites)
        )
        return ResolvedSteering(
            steering=steering,
            plane=index,
            plane_id=self.ids[index],
            layers=layers,
            sites=tuple(sites),
            gates=tuple(entry in wanted for entry in self.steerable),
            window_tag=tag,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "names": self.names,
                "ids": self.ids,
                "num_layers": self.num_layers,
                "steerable": self.steerable,
                "default_layers": self.default_layers,
                "default_sites": self.default_sites,
                "slots": self.slots,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> PlaneCatalog:
        raw = json.loads(text)
        return cls(
            names=tuple(raw["names"]),
            ids=tuple(raw["ids"]),
            num_layers=int(raw["num_layers"]),
            steerable=tuple((int(a), str(b)) for a, b in raw["steerable"]),
            default_layers=tuple(raw["default_layers"]),
            default_sites=tuple(raw["default_sites"]),
            slots=int(raw["slots"]),
        )

    def tracker_fqcn(self) -> str:
        """The tracker's FQCN with this catalog in its class name (zlib + urlsafe base64:
        vLLM splits a FQCN on ':' and '.', neither of which the encoding uses)."""
        token = base64.urlsafe_b64encode(zlib.compress(self.to_json().encode(), 9))
        return f"{TRACKER_FQCN}{CATALOG_SEPARATOR}{token.decode().rstrip('=')}"

    @classmethod
    def from_tracker_name(cls, name: str) -> PlaneCatalog:
        token = name.split(CATALOG_SEPARATOR, 1)[1]
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return cls.from_json(zlib.decompress(raw).decode())


CATALOG_SEPARATOR = "__"  # RotServeBatchTracker__<catalog token>


def is_tracker_fqcn(name: str) -> bool:
    """The tracker's FQCN, with or without a catalog suffix (PlaneCatalog.tracker_fqcn)."""
    name = name.replace(".tracker:", ":")
    return name == TRACKER_FQCN or name.startswith(TRACKER_FQCN + CATALOG_SEPARATOR)


def window_layers(spec: str, num_layers: int) -> list[int]:
    """Absolute sorted layers of a canonical window spec (see canonical_window)."""
    if spec == "all":
        return list(range(num_layers))
    if spec == "none":
        return []
    if ":" in spec:
        a, b = (int(p) if p else None for p in spec.split(":"))
        return list(range(num_layers))[slice(a, b)]
    return _absolute_layers([int(x) for x in spec.split(",")], num_layers, RequestSteeringError)


def canonical_window(value: Any, name: str = "layers") -> str:
    """A layer window in one spelling: "all", "none" (steer no layer), "a:b" (a Python slice,
    negatives from the end, either end may be empty) or "3,4,5" (a list; negatives too).

    Accepts those strings, an int, or a list of ints; raises RequestSteeringError otherwise.
    """
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise RequestSteeringError(f"{name} must list layer indices (ints), got {value!r}")
        return ",".join(str(int(i)) for i in value) if value else "none"
    if not isinstance(value, str):
        raise RequestSteeringError(
            f"{name} must be a layer window: 'all', 'none', 'a:b', '3,4,5' or a list of "
            f"ints, got {type(value).__name__} {value!r}"
        )
    text = value.replace(" ", "").lower()
    if text in ("all", "none"):
        return text
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 2:
                raise ValueError
            a, b = (int(p) if p else None for p in parts)
            return f"{'' if a is None else a}:{'' if b is None else b}"
        return ",".join(str(int(x)) for x in text.split(","))
    except ValueError:
        raise RequestSteeringError(
            f"{name} must be a layer window: 'all', 'none', 'a:b', '3,4,5' or a list of "
            f"ints, got {value!r}"
        ) from None


def _ranges(layers: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> "0-2.5.7-8" (short, and free of the characters a salt may not hold)."""
    out: list[str] = []
    for i in sorted(layers):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return ".".join(str(a) if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


def _request_sites(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [s for s in value.replace(" ", "").split(",") if s]
    if not isinstance(value, Sequence) or not value or not all(isinstance(s, str) for s in value):
        raise RequestSteeringError(
            f"{name} must be a non-empty list (or comma-separated string) of sites from "
            f"{', '.join(DEFAULT_SITES)}, got {value!r}"
        )
    unknown = [s for s in value if s not in DEFAULT_SITES]
    if unknown:
        raise RequestSteeringError(
            f"{name}: unknown site(s) {unknown}; choose from {', '.join(DEFAULT_SITES)}"
        )
    return tuple(s for s in DEFAULT_SITES if s in value)


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
        layers=None if layers is None else canonical_window(layers, spell("layers")),
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
