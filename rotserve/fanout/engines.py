"""How an actor builds its engine: a small picklable spec, and the factory that turns it into a
RotServeEngine (vLLM with the rotserve plugin, or the stock model for a judge)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rotserve.fanout.cluster import Placement

if TYPE_CHECKING:
    from rotserve.engine import RotServeEngine


@dataclass(frozen=True)
class PlaneFile:
    """A plane as it travels to an actor: its name, the driver's path, and the file itself
    for nodes that cannot see the driver's disk."""

    name: str
    path: str
    data: bytes
    sha256: str

    def local_path(self) -> str:
        """The plane's path, or a local copy of its bytes on a node that cannot see it."""
        path = Path(self.path)
        if path.is_file() and path.stat().st_size == len(self.data):
            return str(path)
        copy = Path(tempfile.gettempdir()) / f"rotserve-plane-{self.sha256[:16]}.safetensors"
        if not copy.is_file():
            tmp = copy.with_name(copy.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(self.data)
            os.replace(tmp, copy)
        return str(copy)


@dataclass(frozen=True)
class EngineSpec:
    """How to build one engine; shipped to every actor (so it must stay small and picklable).

    `plane`: the one plane of a single-plane engine; `planes`: a sweep's planes (slot order);
    neither: the stock model, unsteered (a judge's engine)."""

    model: str
    plane: PlaneFile | None = None
    planes: tuple[PlaneFile, ...] = ()
    dtype: str = "auto"
    revision: str | None = None
    tensor_parallel_size: int = 1
    llm_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def steered(self) -> bool:
        return self.plane is not None or bool(self.planes)


def engine_spec(
    where: Placement,
    model: str,
    *,
    dtype: str,
    enforce_eager: bool,
    revision: str | None,
    plane: PlaneFile | None = None,
    planes: tuple[PlaneFile, ...] = (),
    llm_kwargs: dict[str, Any] | None = None,
) -> EngineSpec:
    """The EngineSpec of every engine of a fan-out, from its placement and the job's model
    settings; `llm_kwargs` (the job's own vLLM arguments) win over the placement's."""
    kwargs = {
        **engine_kwargs(where.use_gpu),
        **({"enforce_eager": True} if enforce_eager else {}),
        **(llm_kwargs or {}),
    }
    return EngineSpec(
        model=model,
        plane=plane,
        planes=planes,
        dtype=dtype,
        revision=revision,
        tensor_parallel_size=where.tensor_parallel_size,
        llm_kwargs=kwargs,
    )


def engine_kwargs(use_gpu: bool) -> dict[str, Any]:
    """vLLM arguments per placement.

    CPU: engine core and model worker in the actor's own process ("uni" executor, no
    multiprocessing). A CPU engine is then exactly one process on its one pinned core, so
    Ray's num_cpus accounting is true, starting it spawns no further interpreters (measured
    on the 2-core dev machine: ~33 s instead of ~55 s per engine), and killing the actor
    leaves no orphan engine-core process. Outputs are token-identical to the default layout.
    GPU: vLLM's defaults (a separate engine-core process overlaps scheduling with the GPU).
    """
    return {} if use_gpu else {"distributed_executor_backend": "uni"}


def make_engine(spec: EngineSpec) -> RotServeEngine:
    """The real engine: RotServeEngine (vLLM + the rotserve plugin) for one actor."""
    from rotserve.engine import RotServeEngine

    kwargs = dict(spec.llm_kwargs)
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = spec.tensor_parallel_size
        # Inside a Ray actor, vLLM's own workers are processes on the actor's GPUs.
        kwargs.setdefault("distributed_executor_backend", "mp")
    if spec.planes:
        planes = {p.name: p.local_path() for p in spec.planes}
        return RotServeEngine(spec.model, planes=planes, dtype=spec.dtype, **kwargs)
    plane = spec.plane.local_path() if spec.plane is not None else None
    return RotServeEngine(spec.model, plane, dtype=spec.dtype, **kwargs)
