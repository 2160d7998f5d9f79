"""One way to set up a steered model: every check, then the two vLLM settings the plugin needs.

    setup = prepare_steering("Qwen/Qwen2.5-7B-Instruct", "plane.safetensors", layers=[10, 11])
    LLM(model, hf_overrides=setup.hf_overrides(), logits_processors=setup.logits_processors())

The engine class, the server and the grid's resolve step all call `prepare_steering`, so a
mistake fails the same way everywhere, in about a second, before any engine starts:
- the architecture has a rotated variant;
- the plane loads (finite, orthonormal) and matches the model's hidden size;
- the layers are in range and the sites are norms every decoder layer has.

No vLLM import here: the grid resolves its request on a machine that may not even have vLLM.
The model's config is read with transformers' AutoConfig (never trust_remote_code): a local
directory is read from disk, a hub id is fetched like any HF download.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotserve.plane import Plane, PlaneError, load_plane
from rotserve.steering.architectures import rotated_architecture
from rotserve.steering.catalog import PlaneCatalog, ResolvedSteering, is_tracker_fqcn
from rotserve.steering.errors import RotServeConfigError
from rotserve.steering.request import RequestSteering
from rotserve.steering.settings import (
    DEFAULT_PLANE,
    SETTINGS_KEY,
    EngineSteering,
    check_plane_name,
)


class ModelConfigError(RotServeConfigError):
    """The model's config cannot be read, or lacks what steering needs."""


@dataclass(frozen=True)
class ModelInfo:
    """What steering needs to know of a model, from its HF config (text config if multimodal)."""

    model: str
    architecture: str  # the stock architecture, e.g. Qwen2ForCausalLM
    hidden_size: int
    num_layers: int

    @classmethod
    def from_pretrained(cls, model: str | Path, revision: str | None = None) -> ModelInfo:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(
                str(model), revision=revision, trust_remote_code=False
            )
        except Exception as e:  # OSError, ValueError, hub errors: all "cannot use this model"
            raise ModelConfigError(
                f"model {model}: cannot load its config ({type(e).__name__}: {e})"
            ) from None
        text = config.get_text_config()
        hidden_size = getattr(text, "hidden_size", None)
        num_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(hidden_size, int) or not isinstance(num_layers, int):
            raise ModelConfigError(
                f"model {model}: its config has no hidden_size / num_hidden_layers; "
                "rotserve steers decoder-only chat models"
            )
        architectures = getattr(config, "architectures", None) or ["(none in config.json)"]
        return cls(str(model), architectures[0], hidden_size, num_layers)


@dataclass(frozen=True)
class SteeringSetup:
    """A checked (model, planes, layers, sites) and the vLLM settings that steer it."""

    info: ModelInfo
    plane: Plane  # the default plane (the first)
    settings: EngineSteering  # plane paths (absolute), default window and sites, steerable set
    rotated_architecture: str
    planes: tuple[Plane, ...] = ()  # every plane, in slot order (names: settings.plane_names)

    @property
    def catalog(self) -> PlaneCatalog:
        """What requests may name: planes by name or id, windows inside the steerable set."""
        return PlaneCatalog.build(
            self.settings, [p.plane_id for p in self.planes or (self.plane,)], self.info.num_layers
        )

    def resolve(self, steering: RequestSteering) -> ResolvedSteering:
        """One request against this engine (RequestSteeringError for an unknown plane or an
        unsteerable layer): its plane slot, gates and prefix-cache salt."""
        return self.catalog.resolve(steering)

    @property
    def plane_path(self) -> Path:
        return self.settings.plane_path

    def hf_overrides(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """`base` plus the rotated architecture and the plane settings (they win)."""
        return {
            **(base or {}),
            "architectures": [self.rotated_architecture],
            SETTINGS_KEY: self.settings.to_dict(),
        }

    def logits_processors(self, base: Sequence[Any] | None = None) -> list[Any]:
        """`base` plus the per-request tracker, unless it is already there."""
        listed = list(base or [])
        return listed if tracker_installed(listed) else [*listed, self.catalog.tracker_fqcn()]


def prepare_steering(
    model: str | Path,
    plane: str | Path | None,
    *,
    layers: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
    revision: str | None = None,
    info: ModelInfo | None = None,
    planes: Mapping[str, str | Path] | None = None,
    max_planes: int | None = None,
    steerable_layers: Sequence[int] | None = None,
) -> SteeringSetup:
    """Check that the plane file(s) can steer `model` at `layers` x `sites`; raise with the fix
    if not. `info` skips re-reading a config the caller already read.

    One plane (`plane`, named "default") or several (`planes`, name -> file; the first is
    what a request naming no plane steers). `layers` and `sites` are the default window of a
    request; `steerable_layers` (default: every layer) bounds the windows requests may name.
    """
    info = info or ModelInfo.from_pretrained(model, revision)
    architecture = rotated_architecture(info.architecture)
    if (plane is None) == (planes is None):
        raise RotServeConfigError("give one plane file or a mapping of planes, not both/neither")
    named = dict(planes) if planes is not None else {DEFAULT_PLANE: plane}
    paths = {name: str(Path(p).expanduser().resolve()) for name, p in named.items()}
    raw: dict[str, Any] = {
        "layers": list(layers) if layers is not None else None,
        "sites": list(sites) if sites is not None else None,
    }
    if planes is None:
        raw["plane"] = paths[DEFAULT_PLANE]
    else:
        raw["planes"] = paths
    if max_planes is not None:
        raw["max_planes"] = max_planes
    if steerable_layers is not None:
        raw["steerable"] = {"layers": list(steerable_layers), "sites": None}
    settings = EngineSteering.from_dict(raw)
    loaded = []
    for name, path in settings.planes:
        try:
            one = load_plane(path)
            one.check_hidden_size(info.hidden_size, model=info.model)
        except PlaneError as e:
            raise PlaneError(f"plane {name!r}: {e}") if planes is not None else e from None
        loaded.append(one)
    settings.check(info.num_layers, architecture)
    return SteeringSetup(info, loaded[0], settings, architecture, tuple(loaded))


def tracker_installed(listed: Sequence[Any]) -> bool:
    """Is the tracker already in the user's list, or loaded by a `vllm.logits_processors`
    entry point? (vLLM would instantiate it twice otherwise.)"""
    from importlib.metadata import entry_points

    names = [p for p in listed if isinstance(p, str)]
    names += [ep.value for ep in entry_points(group="vllm.logits_processors")]
    return any(is_tracker_fqcn(name) for name in names) or any(
        getattr(p, "__name__", "").startswith("RotServeBatchTracker") for p in listed
    )


def plane_options(values: list[str]) -> tuple[str | None, dict[str, str] | None]:
    """--plane values -> (one plane file, None) or (None, {name: file}).

    Bare FILEs are the single-plane form (the last given wins); otherwise every value must be
    NAME=FILE.
    """
    if all("=" not in v for v in values):
        return values[-1], None  # bare files: the last one wins, as for any repeated flag
    planes: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise RotServeConfigError(
                f"--plane {value!r}: with several planes give each as NAME=FILE "
                "(e.g. --plane maxsim=plane.safetensors --plane rand=random.safetensors)"
            )
        if name in planes:
            raise RotServeConfigError(f"--plane: the name {name!r} is given twice")
        planes[check_plane_name(name)] = path
    return None, planes
