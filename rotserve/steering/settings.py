"""A steered engine's settings: its planes, default window and sites, and steerable set.

They travel inside the model's HF config, set through vLLM's `hf_overrides["rotserve"]`, so
every worker reads them and they enter vLLM's compile-cache key (see docs/DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotserve.steering.architectures import SITES
from rotserve.steering.errors import RotServeConfigError
from rotserve.steering.window import WindowError, absolute_layers

SETTINGS_KEY = "rotserve"  # key inside hf_overrides / the HF config
SETTINGS_FIELDS = ("plane", "planes", "max_planes", "layers", "sites", "steerable")
DEFAULT_PLANE = "default"  # the name of the single-plane form's plane
# Plane names ride in request arguments, cache salts and the tracker's class name (see
# PlaneCatalog.tracker_fqcn), so they are kept to characters all three carry unchanged.
PLANE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


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
    sites: tuple[str, ...] = SITES  # default sites
    max_planes: int | None = None  # plane slots; None = as many as planes
    steerable_layers: tuple[int, ...] | None = None  # None = every decoder layer
    steerable_sites: tuple[str, ...] = SITES

    @property
    def plane_path(self) -> Path:
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
            out["plane"] = str(self.plane_path.resolve())
        else:
            out["planes"] = {name: str(path.resolve()) for name, path in self.planes}
            if self.max_planes is not None:
                out["max_planes"] = self.max_planes
        out["layers"] = list(self.layers) if self.layers is not None else None
        out["sites"] = list(self.sites)
        if self.steerable_layers is not None or self.steerable_sites != SITES:
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
        unknown = [s for s in (*self.sites, *self.steerable_sites) if s not in SITES]
        if unknown:
            raise RotServeConfigError(
                f"unknown steering site(s) {unknown} for {architecture}; "
                f"choose from {', '.join(SITES)}"
            )

    def chosen_layers(self, num_layers: int) -> list[int]:
        """The default window: absolute, sorted layer indices (negatives count from the end)."""
        return _engine_layers(self.layers, num_layers)

    def steerable(self, num_layers: int) -> tuple[tuple[int, str], ...]:
        """(layer, site) of every rotated norm, in gate-column order (layer-major).

        The union of the steerable set and the default window x default sites, so the
        default request always fits.
        """
        layers = set(_engine_layers(self.steerable_layers, num_layers, "steerable layers"))
        layers |= set(self.chosen_layers(num_layers))
        sites = [s for s in SITES if s in (*self.steerable_sites, *self.sites)]
        sites += [s for s in dict.fromkeys((*self.steerable_sites, *self.sites)) if s not in sites]
        return tuple((layer, site) for layer in sorted(layers) for site in sites)


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


def _engine_layers(
    layers: Sequence[int] | None, num_layers: int, name: str | None = None
) -> list[int]:
    # An engine setting out of range stops the engine, not one request: RotServeConfigError.
    try:
        return absolute_layers(layers, num_layers, name)
    except WindowError as e:
        raise RotServeConfigError(str(e)) from None


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
        return SITES
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or not value
        or not all(isinstance(s, str) and s for s in value)
    ):
        raise RotServeConfigError(
            f'hf_overrides["rotserve"]["sites"] must be null (default {list(SITES)}) '
            f"or a non-empty list of norm module names, got {value!r}"
        )
    return tuple(dict.fromkeys(value))  # dedupe, keep order
