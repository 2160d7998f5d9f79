"""The steering plane artifact: b1, b2 and the evidence behind them, in one .safetensors file.

The file holds two float32 tensors `b1`, `b2` [hidden_size] and, in the safetensors header,
one metadata key `rotserve` whose value is the JSON of PlaneMeta. Safetensors cannot run
code when loaded, unlike pickled .npy/.pt files, so a plane from anyone is safe to open.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rotserve._version import __version__

# ‖b1‖, ‖b2‖ within this of 1 and |b1·b2| below it. float32 Gram-Schmidt on a hidden size of
# 8192 lands around 1e-6; 1e-3 rejects planes that are wrong, not ones that are rounded.
ORTHONORMAL_TOL = 1e-3
META_KEY = "rotserve"


class PlaneError(ValueError):
    """A plane file or tensor that cannot be used; the message says why and what to do."""


@dataclass
class PlaneMeta:
    """Where a plane came from. Everything a reader needs to trust or reproduce it."""

    model: str = ""
    hidden_size: int = 0
    method: dict[str, Any] = field(default_factory=dict)  # select, second, site, layer, ...
    candidates: list[dict[str, Any]] = field(default_factory=list)  # per-site statistics
    data: dict[str, Any] = field(default_factory=dict)  # prompt files, counts, sha256
    rotserve_version: str = ""
    created: str = ""


@dataclass
class Plane:
    """An orthonormal basis (b1, b2) of the steering plane. b1 points toward refusal."""

    b1: torch.Tensor
    b2: torch.Tensor
    meta: PlaneMeta = field(default_factory=PlaneMeta)

    def __post_init__(self) -> None:
        self.b1 = self.b1.detach().to(torch.float32).cpu().contiguous()
        self.b2 = self.b2.detach().to(torch.float32).cpu().contiguous()
        validate_basis(self.b1, self.b2)
        if not self.meta.hidden_size:
            self.meta.hidden_size = self.hidden_size

    @property
    def hidden_size(self) -> int:
        return int(self.b1.numel())

    @property
    def basis(self) -> torch.Tensor:
        """[2, hidden_size] float32, rows b1 and b2: the form the rotation kernel takes."""
        return torch.stack([self.b1, self.b2])

    def check_hidden_size(self, hidden_size: int, model: str = "the model") -> None:
        if self.hidden_size != hidden_size:
            raise PlaneError(
                f"plane has hidden size {self.hidden_size} but {model} has {hidden_size}: "
                f"the plane was extracted from a different model "
                f"({self.meta.model or 'unknown'}); extract one for this model with "
                f"`rotserve extract --model ...`"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.meta
        if not meta.created:
            meta.created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        if not meta.rotserve_version:
            meta.rotserve_version = __version__
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {"b1": self.b1, "b2": self.b2},
            str(tmp),
            metadata={META_KEY: json.dumps(asdict(meta), default=_json_default)},
        )
        tmp.replace(path)  # atomic: a reader never sees half a plane
        return path

    @property
    def plane_id(self) -> str:
        """Short content hash of the basis: two files with the same plane share the id."""
        h = hashlib.sha256(self.b1.numpy().tobytes() + self.b2.numpy().tobytes())
        return h.hexdigest()[:12]


SELECTIVE_SITE = "resid_mid"  # the residual stream inside a layer, where both norms read it


def selective_layers(plane: Plane, name: str = "plane") -> list[int]:
    """Layers whose mean harmful and mean harmless activations (normalised, at the layer's
    resid_mid) project onto b1 with opposite signs: the layers where b1 separates the classes
    by sign, the ones the selective window steers.

    Read from the extraction statistics in the plane's metadata (`harmful_b1`,
    `harmless_b1` per candidate site); PlaneError for a plane extracted without them.
    """
    rows = [c for c in plane.meta.candidates if c.get("kind") == SELECTIVE_SITE]
    if not rows or any(c.get("harmful_b1") is None or c.get("harmless_b1") is None for c in rows):
        raise PlaneError(
            f"{name} has no per-layer class projections on b1 in its metadata (extracted by "
            f"an older rotserve, or not by `rotserve extract`), so its selective layers are "
            f"unknown: re-extract it with `rotserve extract`, or give a window (--layers a:b)"
        )
    return sorted(
        int(c["layer"]) for c in rows if float(c["harmful_b1"]) * float(c["harmless_b1"]) < 0
    )


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in plane metadata")


def validate_basis(b1: torch.Tensor, b2: torch.Tensor, tol: float = ORTHONORMAL_TOL) -> None:
    """Raise PlaneError unless b1, b2 are finite 1-D vectors of one size, orthonormal within tol."""
    for name, v in (("b1", b1), ("b2", b2)):
        if v.ndim != 1:
            raise PlaneError(
                f"{name} must be a 1-D vector [hidden_size], got shape {tuple(v.shape)}"
            )
        if not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise PlaneError(f"{name} has {bad} NaN/inf entries: the plane file is corrupt")
    if b1.numel() != b2.numel():
        raise PlaneError(f"b1 has {b1.numel()} entries and b2 has {b2.numel()}: they must match")
    n1, n2 = float(b1.double().norm()), float(b2.double().norm())
    dot = float(b1.double() @ b2.double())
    if abs(n1 - 1) > tol or abs(n2 - 1) > tol or abs(dot) > tol:
        raise PlaneError(
            f"plane is not orthonormal: ‖b1‖={n1:.6f}, ‖b2‖={n2:.6f}, b1·b2={dot:.2e} "
            f"(tolerance {tol}); orthonormalise it first, e.g. rotserve.plane.orthonormal_plane(b1, b2)"
        )


def orthonormal_plane(b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram-Schmidt: normalise b1, remove its component from b2, normalise b2 (float32)."""
    u1 = b1.double() / b1.double().norm()
    v2 = b2.double() - (b2.double() @ u1) * u1
    norm2 = v2.norm()
    if not math.isfinite(float(norm2)) or norm2 < 1e-8:
        raise PlaneError("b2 is parallel to b1 (or zero): the two vectors span no plane")
    return u1.float(), (v2 / norm2).float()


def random_plane(hidden_size: int, seed: int, model: str = "") -> Plane:
    """A seeded random orthonormal plane: a control, or a stand-in where any plane will do
    (parity checks, benchmarks). Same (hidden_size, seed) -> the same basis."""
    g = torch.Generator().manual_seed(seed)
    b1, b2 = orthonormal_plane(
        torch.randn(hidden_size, generator=g), torch.randn(hidden_size, generator=g)
    )
    return Plane(b1, b2, PlaneMeta(model=model, method={"kind": "random", "seed": seed}))


def load_plane(path: str | Path, hidden_size: int | None = None) -> Plane:
    """Load and validate a plane; with hidden_size, also check it fits the model."""
    path = Path(path)
    if not path.is_file():
        raise PlaneError(f"plane file not found: {path}")
    if path.suffix in {".npy", ".pt", ".pth", ".pkl", ".pickle"}:
        raise PlaneError(
            f"{path.name}: rotserve only loads planes from .safetensors (pickled formats can "
            f"run code when loaded); convert it with rotserve.Plane(b1, b2).save('plane.safetensors')"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            header = f.metadata() or {}
            missing = {"b1", "b2"} - keys
            if missing:
                raise PlaneError(
                    f"{path}: missing tensor(s) {sorted(missing)}; found {sorted(keys)}"
                )
            b1, b2 = f.get_tensor("b1"), f.get_tensor("b2")
    except PlaneError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise PlaneError(f"{path} is not a readable .safetensors file: {e}") from e
    raw = json.loads(header.get(META_KEY, "{}"))
    known = {k: v for k, v in raw.items() if k in PlaneMeta.__dataclass_fields__}
    try:
        plane = Plane(b1, b2, PlaneMeta(**known))
    except PlaneError as e:
        raise PlaneError(f"{path}: {e}") from None
    if hidden_size is not None:
        plane.check_hidden_size(hidden_size)
    return plane


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
