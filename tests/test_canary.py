"""The start-up canary: each of its checks fails on the fault it exists for.

The checks are pure (probe results in, checks out), so every fault is first specified on
hand-made results. Then one real engine whose decode steps are made to run unsteered (the
CUDA-graph replay failure, emulated on CPU by resetting the per-token table on pure decode
steps) must refuse to start, naming the check, the runner and the CUDA-graph mode. Every other
steered engine the suite starts runs the canary too and passes it. Costs one engine start
(~20 s on 2 cores).
"""

from __future__ import annotations

import pytest
from vllm_fixtures import require_vllm

from rotserve.canary import (
    PROBE_STEERINGS,
    CanaryError,
    CanaryReport,
    ProbeResult,
    check_probes,
    first_probes,
    refeed_probes,
)
from rotserve.parity import ENGINE_KWARGS

TOL = 1e-3
PROMPT = (5, 6, 7, 8)
GEN = (9, 10, 11, 12)
# Per steering: log-probs of prompt tokens 1..3 and of generated tokens 0..3 when everything
# is right. Unsteered and the two steerings differ clearly.
TRUE_PROMPT_LPS = {0: (-1.0, -1.0, -1.0), 1: (-2.0, -2.5, -3.0), 2: (-0.5, -0.7, -0.9)}
TRUE_GEN_LPS = {
    0: (-0.1, -0.2, -0.3, -0.4),
    1: (-1.1, -1.2, -1.3, -1.4),
    2: (-2.1, -2.2, -2.3, -2.4),
}


def _result(prompt_lps, gen_lps) -> ProbeResult:
    return ProbeResult(PROMPT, tuple(prompt_lps), GEN, tuple(gen_lps))


def _refeed(steering: int) -> ProbeResult:
    """The whole sequence as a prompt: log-probs of prompt tokens 1..3 then of GEN."""
    lps = TRUE_PROMPT_LPS[steering] + TRUE_GEN_LPS[steering]
    return ProbeResult(PROMPT + GEN, lps, (1,), (-0.5,))


def _check(batch=None, alone=None, refeed=None, tol=TOL):
    probes = first_probes("test")
    right = [_result(TRUE_PROMPT_LPS[i], TRUE_GEN_LPS[i]) for i in range(3)]
    batch = batch or right
    alone = alone or right
    if refeed is None:  # refeed_probes order: per probe, (its own steering, unsteered)
        refeed = [_refeed(0), _refeed(0), _refeed(1), _refeed(0), _refeed(2), _refeed(0)]
    assert len(refeed_probes(probes, batch)) == len(refeed)
    return {c.name: c for c in check_probes(probes, batch, alone, refeed, tol)}


def test_a_right_engine_passes_every_check():
    checks = _check()
    assert [c.ok for c in checks.values()] == [True, True, True], checks


def test_decode_steps_that_ran_unsteered_fail_the_decode_check():
    # The prompt was steered, but tokens 1..3 came from unsteered decode steps.
    batch = [
        _result(TRUE_PROMPT_LPS[i], TRUE_GEN_LPS[i][:1] + TRUE_GEN_LPS[0][1:]) for i in range(3)
    ]
    checks = _check(batch=batch, alone=batch)
    assert checks["prefill is steered"].ok and checks["a mixed batch equals each request alone"].ok
    assert not checks["decode is steered"].ok


def test_rows_mapped_to_the_wrong_requests_fail_the_mixed_batch_check():
    # In the batch every request got the first request's (unsteered) row; alone they are right.
    batch = [_result(TRUE_PROMPT_LPS[0], TRUE_GEN_LPS[0]) for _ in range(3)]
    checks = _check(batch=batch)
    assert not checks["a mixed batch equals each request alone"].ok
    assert not checks["prefill is steered"].ok


def test_one_probe_with_power_is_enough_for_the_decode_check():
    # Probe 2's steering barely moves its greedy tokens; probe 1 shows decode is steered.
    weak = ProbeResult(PROMPT + GEN, TRUE_PROMPT_LPS[2] + TRUE_GEN_LPS[0], (1,), (-0.5,))
    batch = [_result(TRUE_PROMPT_LPS[i], TRUE_GEN_LPS[i]) for i in range(2)]
    batch.append(_result(TRUE_PROMPT_LPS[2], TRUE_GEN_LPS[2][:1] + TRUE_GEN_LPS[0][1:]))
    refeed = [_refeed(0), _refeed(0), _refeed(1), _refeed(0), weak, _refeed(0)]
    checks = _check(batch=batch, alone=batch, refeed=refeed)
    assert checks["decode is steered"].ok, checks["decode is steered"].detail


def test_steering_that_changes_nothing_proves_nothing():
    same = [_result(TRUE_PROMPT_LPS[0], TRUE_GEN_LPS[0]) for _ in range(3)]
    checks = _check(batch=same, alone=same, refeed=[_refeed(0)] * 6)
    assert not checks["prefill is steered"].ok
    assert not checks["decode is steered"].ok  # no power: steered and unsteered re-runs agree


def test_weak_steering_in_half_precision_passes_when_it_exceeds_the_measured_noise():
    """A random plane on a 2-layer model in bfloat16 moves log-probs by ~0.1 nat, about the
    dtype's tolerance, but far above the noise measured between batch and alone."""
    noise = 0.005

    def lps(base, shift, n):
        return tuple(base - shift * (k + 1) / n for k in range(n))

    p_lps = {i: lps(-1.0, 0.12 * i, 3) for i in range(3)}
    g_lps = {i: lps(-0.5, 0.12 * i, 4) for i in range(3)}
    batch = [_result(p_lps[i], g_lps[i]) for i in range(3)]
    alone = [_result(tuple(x + noise for x in p_lps[i]), g_lps[i]) for i in range(3)]
    refeed = []
    for i in range(3):
        refeed.append(ProbeResult(PROMPT + GEN, p_lps[i] + g_lps[i], (1,), (-0.5,)))
        refeed.append(ProbeResult(PROMPT + GEN, p_lps[0] + g_lps[0], (1,), (-0.5,)))
    checks = _check(batch=batch, alone=alone, refeed=refeed, tol=0.1)
    assert all(c.ok for c in checks.values()), checks


def test_the_probes_cover_unsteered_and_two_steerings_each_salted_apart():
    probes = first_probes("n")
    assert [p.steering for p in probes] == list(PROBE_STEERINGS)
    assert sum(p.steering.active for p in probes) == 2
    assert len({p.salt for p in probes}) == 3


def test_a_failed_report_names_the_stack_and_the_check():
    checks = tuple(_check(refeed=[_refeed(0)] * 6).values())
    report = CanaryReport(checks, {"runner": "V2", "cudagraph_mode": "FULL_AND_PIECEWISE"})
    with pytest.raises(CanaryError, match=r"runner V2.*cudagraph_mode FULL_AND_PIECEWISE.*decode"):
        report.raise_if_failed()


def test_an_engine_whose_decode_steps_run_unsteered_refuses_to_start_emulated_cuda_graph_fault(
    tiny_qwen2, tiny_plane, monkeypatch
):
    """A CUDA-graph replay that skips the table update cannot happen on CPU; resetting the
    table on every pure decode step is the same fault, one level up."""
    require_vllm()
    from benchmarks.in_process import in_process_engine
    from rotserve.engine import RotServeEngine
    from rotserve.vllm_plugin.models import RotServeCausalLMMixin

    refresh = RotServeCausalLMMixin._refresh_rotation_v1

    def decode_unsteered(self, num_tokens: int) -> None:
        refresh(self, num_tokens)
        if num_tokens == self._rotserve_tracker.batch_size:  # one token per request: decode
            self.rotation.set_identity(num_tokens)

    monkeypatch.setattr(RotServeCausalLMMixin, "_refresh_rotation_v1", decode_unsteered)
    with in_process_engine(), pytest.raises(CanaryError, match="decode is steered") as err:
        RotServeEngine(tiny_qwen2, tiny_plane, **ENGINE_KWARGS)
    message = str(err.value)
    assert "decode is steered" in message and "runner V1" in message
    assert "cudagraph_mode" in message
    assert "prefill is steered" not in message  # the prompt was steered: only decode fails
