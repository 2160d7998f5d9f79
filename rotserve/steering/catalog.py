"""What a request may name on one engine (PlaneCatalog), and a request resolved against it.

The catalog also rides, compressed, in the tracker's class name (`TRACKER_FQCN` plus
`__<token>`), so vLLM's frontend can refuse an unknown plane or layer before any worker sees it.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from rotserve.steering.architectures import SITES
from rotserve.steering.errors import RequestSteeringError
from rotserve.steering.request import RequestSteering
from rotserve.steering.settings import EngineSteering
from rotserve.steering.window import layer_ranges, window_layers

# The logits processor that validates requests and, on V1, tracks the batch layout.
TRACKER_FQCN = "rotserve.vllm_plugin:RotServeBatchTracker"
CATALOG_SEPARATOR = "__"  # RotServeBatchTracker__<catalog token>


@dataclass(frozen=True)
class ResolvedSteering:
    """A request's steering against one engine: plane slot and the gate of every steered norm."""

    steering: RequestSteering
    slot: int  # the plane's slot index in the engine (its name is catalog.names[slot])
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
        if steering.window is None:
            layers = self.default_layers
        else:
            layers = tuple(window_layers(steering.window, self.num_layers))
        sites = self.default_sites if steering.sites is None else steering.sites
        wanted = {(layer, site) for layer in layers for site in sites}
        missing = sorted(wanted - set(self.steerable))
        if missing:
            layer, site = missing[0]
            steerable_layers = sorted({la for la, _ in self.steerable})
            raise RequestSteeringError(
                f"layer {layer} site {site} is not steerable on this engine "
                f"({len(missing)} such (layer, site) pairs); steerable layers: "
                f"{layer_ranges(steerable_layers) or 'none'}, sites: "
                f"{', '.join(dict.fromkeys(s for _, s in self.steerable))} (start the engine "
                f"with a wider steerable set)"
            )
        default = layers == self.default_layers and tuple(sites) == self.default_sites
        tag = (
            ""
            if default
            else f"L{layer_ranges(layers) or 'none'}S" + "".join(str(SITES.index(s)) for s in sites)
        )
        return ResolvedSteering(
            steering=steering,
            slot=index,
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


def is_tracker_fqcn(name: str) -> bool:
    """The tracker's FQCN, with or without a catalog suffix (PlaneCatalog.tracker_fqcn)."""
    name = name.replace(".tracker:", ":")
    return name == TRACKER_FQCN or name.startswith(TRACKER_FQCN + CATALOG_SEPARATOR)
