"""Rotated variants of vLLM's Qwen2, Llama, Mistral and Qwen3 causal LMs.

Each is the stock class plus, after the stock constructor:
- the planes, loaded from hf_config.rotserve ("plane" or "planes") and checked against the
  hidden size (PlaneError before anything runs), and the PlaneCatalog requests resolve in;
- one RotationState (bases + per-token table buffers) shared by every steered norm;
- RotatedRMSNorm swapped in at every steerable (layer, site), each with its gate column;
- a runner check: V1 needs the RotServeBatchTracker logits processor (claimed here, so a
  missing registration fails the engine start) and no FULL CUDA graphs (they would replay
  without running the table update below); V2 uses RotServeModelState, which must attach
  before the first forward.

The compiled part (the stock `*Model`, decorated with @support_torch_compile) traces through
RotatedRMSNorm; it reads the table buffer and never branches on it. The outer `forward`
(not compiled) refreshes the table on V1 from the forward context.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.sequence import IntermediateTensors

from rotserve.plane import load_plane
from rotserve.steering import (
    TRACKER_FQCN,
    EngineSteering,
    PlaneCatalog,
    RotServeConfigError,
)
from rotserve.steering.table import RotationState
from rotserve.vllm_plugin.layers import install_rotation
from rotserve.vllm_plugin.tracker import (
    RotServeBatchTracker,
    claim_tracker,
    tracker_registered,
)

logger = init_logger(__name__)


class RotServeCausalLMMixin:
    """Everything the four rotated classes share; listed before the stock base class."""

    rotation: RotationState

    def _install_rotserve(self, vllm_config: VllmConfig) -> None:
        arch = type(self).__name__
        model_config = vllm_config.model_config
        settings = EngineSteering.from_hf_config(model_config.hf_config, arch)
        planes = [load_plane(path) for _, path in settings.planes]
        for plane in planes:
            plane.check_hidden_size(self.config.hidden_size, model=str(model_config.model))
        layers = self.model.layers
        self.rotserve_catalog = PlaneCatalog.build(
            settings, [p.plane_id for p in planes], len(layers)
        )
        # Unused slots stay zero: no request can name them (the catalog has no entry). float32
        # whatever the model dtype: vLLM builds the model under its dtype as torch's default,
        # and a bf16 copy of the plane would turn every steered angle by a little.
        bases = torch.zeros(settings.slots, 2, self.config.hidden_size, dtype=torch.float32)
        for slot, plane in enumerate(planes):
            bases[slot] = plane.basis

        device = next(self.parameters()).device
        self.rotation = RotationState(
            bases,
            vllm_config.scheduler_config.max_num_batched_tokens,
            num_gates=len(self.rotserve_catalog.steerable),
        ).to(device)
        steered = install_rotation(layers, self.rotation, self.rotserve_catalog.steerable)
        self._check_runner(vllm_config)
        if self._rotserve_tracker is not None:  # V1: its rows gain our plane and gate columns
            self._rotserve_tracker.attach_catalog(self.rotserve_catalog)
        if vllm_config.cache_config.enable_prefix_caching:
            # Block hashes cover tokens, LoRA and cache_salt, not extra_args: without a salt,
            # a request at one angle would reuse KV computed at another.
            logger.warning(
                "rotserve: prefix caching is on; give every steered request a cache_salt "
                "per (plane, angle, adaptive, mode) (RotServeEngine does; over HTTP send "
                "extra_body={'cache_salt': ...}) or disable prefix caching"
            )
        logger.info(
            "rotserve: %d plane(s) %s in %d slot(s), steerable at %d sites (%s ... %s), runner %s",
            len(planes),
            ", ".join(
                f"{name}={path} (id {p.plane_id})"
                for (name, path), p in zip(settings.planes, planes, strict=True)
            ),
            settings.slots,
            len(steered),
            steered[0] if steered else "-",
            steered[-1] if steered else "-",
            "V2 (RotServeModelState)" if vllm_config.use_v2_model_runner else "V1 (tracker)",
        )

    def _check_runner(self, vllm_config: VllmConfig) -> None:
        """Refuse every configuration in which steering would silently not happen."""
        self._rotserve_runner: str | None = None  # "v1" here, or "v2" once the state attaches
        self._rotserve_tracker: RotServeBatchTracker | None = None
        parallel = vllm_config.parallel_config
        if parallel.enable_dbo or parallel.ubatch_size > 1:
            # Micro-batches run the model on slices of the batch; the table is indexed from
            # token 0, so the second slice would read the first slice's rows.
            raise RotServeConfigError(
                "rotserve does not support micro-batching: dual-batch overlap (enable_dbo="
                f"{parallel.enable_dbo}) and ubatch_size {parallel.ubatch_size} split a step "
                "into slices that would read each other's steering rows; disable enable_dbo "
                "and leave ubatch_size at 0 or 1"
            )
        if vllm_config.use_v2_model_runner:
            # RotServeModelState attaches itself; forward() checks it did. The tracker is still
            # needed on V2 to reject bad requests at admission.
            if not tracker_registered(vllm_config):
                raise RotServeConfigError(_tracker_missing("Model Runner V2"))
            return
        tracker = claim_tracker(vllm_config)
        if tracker is None:
            raise RotServeConfigError(_tracker_missing("the V1 model runner"))
        compilation = vllm_config.compilation_config
        if (
            not vllm_config.model_config.enforce_eager
            and compilation.cudagraph_mode is not None
            and compilation.cudagraph_mode.has_full_cudagraphs()
        ):
            raise RotServeConfigError(
                "rotserve on the V1 model runner cannot use FULL CUDA graphs: a replay skips "
                "the per-step angle table update. Use the V2 runner (vLLM's GPU default), "
                'compilation_config={"cudagraph_mode": "PIECEWISE"}, or enforce_eager=True'
            )
        self._rotserve_tracker = tracker
        self._rotserve_runner = "v1"

    def attach_runner(self, runner: str) -> None:
        """Called by RotServeModelState (V2) once it owns the table updates."""
        self._rotserve_runner = runner

    @staticmethod
    def get_model_state_cls() -> type:
        # Only Model Runner V2 calls this; import lazily so V1 never loads V2 modules.
        from rotserve.vllm_plugin.v2 import RotServeModelState

        return RotServeModelState

    @torch.compiler.disable  # eager even if a caller compiles the whole model
    def _refresh_rotation_v1(self, num_tokens: int) -> None:
        """V1: expand the tracker's per-position rows to this forward's tokens."""
        tracker = self._rotserve_tracker
        assert tracker is not None
        ctx = get_forward_context() if is_forward_context_available() else None
        metadata = ctx.attn_metadata if ctx is not None else None
        if not metadata:
            # Profile and warm-up runs build no attention metadata: no real request.
            self.rotation.set_identity(num_tokens)
            return
        if not isinstance(metadata, dict):
            raise RuntimeError("rotserve (V1): micro-batched forwards are not supported")
        qsl = next(
            (
                m.query_start_loc
                for m in metadata.values()
                if getattr(m, "query_start_loc", None) is not None
            ),
            None,
        )
        if qsl is None:
            backends = sorted({type(m).__name__ for m in metadata.values()})
            raise RuntimeError(
                f"rotserve (V1): attention metadata {backends} has no query_start_loc, so "
                f"tokens cannot be mapped to requests"
            )
        if qsl.shape[0] - 1 < tracker.batch_size:
            raise RuntimeError(
                f"rotserve (V1): the forward has {qsl.shape[0] - 1} requests but the batch "
                f"tracker holds {tracker.batch_size}; token-to-request mapping is broken"
            )
        self.rotation.fill(tracker.rows, qsl, num_tokens, is_padding=ctx.is_padding)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | IntermediateTensors:
        if self._rotserve_runner == "v1":
            self._refresh_rotation_v1(positions.shape[-1])
        elif self._rotserve_runner is None:
            raise RuntimeError(
                f"{type(self).__name__}: no rotserve runner hook is attached (expected "
                f"RotServeModelState on Model Runner V2); refusing to run unsteered"
            )
        return super().forward(  # type: ignore[misc]
            input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs
        )


def _tracker_missing(runner: str) -> str:
    return (
        f"rotserve on {runner} needs its request tracker registered as a logits processor: "
        f'LLM(..., logits_processors=["{TRACKER_FQCN}"]) or `vllm serve ... '
        f"--logits-processors {TRACKER_FQCN}` (rotserve.engine.RotServeEngine does this)"
    )


class RotServeQwen2ForCausalLM(RotServeCausalLMMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_rotserve(vllm_config)


class RotServeQwen3ForCausalLM(RotServeCausalLMMixin, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_rotserve(vllm_config)


class RotServeLlamaForCausalLM(RotServeCausalLMMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_rotserve(vllm_config)


class RotServeMistralForCausalLM(RotServeCausalLMMixin, MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_rotserve(vllm_config)
