"""Model Runner V2 (vLLM's GPU default; needs Triton): per-request angles via a ModelState.

V2 resolves `model.get_model_state_cls()` and then, every step:
- `add_request(req_index, new_req_data)` for each request joining (and each resumed one),
  with its SamplingParams: we write that request slot's angle row (host side);
- `apply_staged_writes()` once after the additions: the changed rows go to the device, from
  pinned memory with a non-blocking copy (RequestRows.sync), so a request joining never
  stalls the CPU on the GPU step still running under async scheduling;
- `prepare_inputs(input_batch, req_states)` before the forward, also before a FULL CUDA
  graph replay (the replay reads only persistent buffers): we expand slot rows to the
  per-token table in place, through `input_batch.idx_mapping` (batch position -> slot; batch
  order is not slot order) and `input_batch.query_start_loc`, all on the device. Tokens at
  or past `query_start_loc[num_reqs]`, up to `num_tokens_after_padding`, get identity.
  `input_batch.is_padding` is deliberately not read: the runner rewrites it per batch only
  while VLLM_MOE_SKIP_PADDING=1, and CUDA-graph capture leaves it all True, so with that
  variable at 0 it would mark every real token as padding. Dummy batches the runner pushes
  through `prepare_inputs` (DP padding, warm-up) map their tokens to slots 0..n-1, whose
  rows may be steered: harmless, their outputs are discarded;
- `prepare_dummy_inputs()` for capture: identity.

Precedent in vLLM: `vllm/model_executor/models/longcat_flash_ngram.py` (LongcatNgramModelState).
Imported lazily (only V2 calls get_model_state_cls), so the V1 path never imports V2 code.
Not exercised on a GPU here (this project's machines are CPU-only): the slot/token logic is
shared with V1 (rotserve.steering.table), and tests/test_v2_contract.py drives vLLM 0.32's
own V2 runner code (InputBuffers, InputBatch, prepare_inputs, execute_model up to the
full-graph replay) on CPU with stand-ins for the GPU-only parts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.utils.platform_utils import is_pin_memory_available
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.states import RequestState

from rotserve.steering import RequestSteeringError, parse_request
from rotserve.steering.table import RequestRows, RotationState

logger = init_logger(__name__)


class RotServeModelState(DefaultModelState):
    """DefaultModelState plus one angle row per request slot, expanded to tokens per step."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        model: nn.Module,
        encoder_cache: Any,
        device: torch.device,
    ) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        rotation = getattr(model, "rotation", None)
        if not isinstance(rotation, RotationState):
            raise TypeError(
                f"RotServeModelState needs a rotserve model (with a RotationState), got "
                f"{type(model).__name__}"
            )
        self.rotation = rotation
        # A model without a catalog (a bare RotationState) gets the plain 5-column rows.
        catalog = getattr(model, "rotserve_catalog", None)
        self.rows = RequestRows(
            self.max_num_reqs, device, catalog=catalog, pin_memory=is_pin_memory_available()
        )
        model.attach_runner("v2")

    def add_request(self, req_index: int, new_req_data: NewRequestData) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        try:
            steering = parse_request(params.extra_args if params is not None else None)
        except RequestSteeringError as e:
            # The frontend validates with the catalog-bound tracker, which the plugin's config
            # hook lists for every rotated model; getting here means that hook did not run.
            # Fail loudly rather than run unsteered.
            raise RequestSteeringError(
                f"request {new_req_data.req_id}: {e} (this request was not validated at "
                f"admission: rotserve's vLLM plugin did not bind its tracker to this engine; "
                f"is the `vllm.general_plugins` entry point of rotserve installed?)"
            ) from None
        self.rows.set(req_index, steering)

    def apply_staged_writes(self) -> None:
        super().apply_staged_writes()
        self.rows.sync()

    def prepare_inputs(self, input_batch: InputBatch, req_states: RequestState) -> dict[str, Any]:
        model_inputs = super().prepare_inputs(input_batch, req_states)
        num_reqs = input_batch.num_reqs
        # query_start_loc and the padded count alone decide padding (module docstring: not
        # is_padding). Requests past num_reqs (FULL-graph request padding) hold no tokens.
        self.rotation.fill(
            self.rows,
            input_batch.query_start_loc[: num_reqs + 1],
            input_batch.num_tokens_after_padding,
            slot_of_request=input_batch.idx_mapping[:num_reqs],
        )
        return model_inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        model_inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)
        self.rotation.set_identity(num_tokens)
        return model_inputs
