"""rotserve.parity's comparison rules, on hand-made completions and a stand-in oracle (cheap).

Its runs on real engines: `rotserve selftest` (tests/test_real_weights.py) and the vLLM plugin
tests through vllm_fixtures.assert_mixed_batch_matches_oracle.
"""

from __future__ import annotations

from rotserve.engine import Completion
from rotserve.parity import oracle_parity, steering_power


def _rec(instruction: str, angle: float | None, tokens: tuple, lps: tuple) -> Completion:
    return Completion(
        instruction=instruction,
        prompt=instruction,
        angle=angle,
        adaptive=False,
        mode="absolute",
        sample=0,
        generation="",
        token_ids=tokens,
        prompt_tokens=2,
        finish_reason="length",
        logprobs=lps,
        prompt_token_ids=(1, 2),
    )


class _Oracle:
    """The HF oracle's interface with fixed answers, to specify the comparison rules."""

    def __init__(self, tokens, lps):
        self.tokens, self.lps = tokens, lps

    def generate(self, prompts, angles, adaptive, max_new_tokens):
        class G:
            token_ids, logprobs = self.tokens, self.lps

        return [G()]

    def continuation_logprobs(self, prompts, conts, angles, adaptive):
        return [self.lps]


def test_float32_parity_demands_the_same_tokens_half_precision_a_logprob_tolerance():
    rec = _rec("x", 90.0, (5, 6, 7), (-0.1, -0.2, -0.3))
    assert oracle_parity(_Oracle((5, 6, 7), (-0.1, -0.2, -0.3)), [rec], "float32").ok
    assert not oracle_parity(_Oracle((5, 6, 8), (-0.1, -0.2, -0.3)), [rec], "float32").ok
    assert not oracle_parity(_Oracle((5, 6, 7), (-0.1, -0.2, -0.31)), [rec], "float32").ok
    assert oracle_parity(_Oracle((5, 6, 7), (-0.1, -0.2, -0.6)), [rec], "bfloat16").ok
    assert not oracle_parity(_Oracle((5, 6, 7), (-0.1, -0.2, -0.9)), [rec], "bfloat16").ok


def test_an_oracle_that_stopped_at_eos_is_compared_up_to_its_stop():
    rec = _rec("x", 90.0, (5, 6, 7, 8), (-0.1, -0.2, -0.3, -9.0))
    assert oracle_parity(_Oracle((5, 6), (-0.1, -0.2)), [rec], "float32").ok


def test_a_given_tolerance_replaces_the_dtypes():
    rec = _rec("x", 90.0, (5, 6, 7), (-0.1, -0.2, -0.3))
    oracle = _Oracle((5, 6, 7), (-0.1, -0.2, -0.3005))
    assert oracle_parity(oracle, [rec], "float32").ok
    assert not oracle_parity(oracle, [rec], "float32", tol=1e-4).ok


def test_steering_that_changes_no_generation_fails_the_power_check():
    base = _rec("x", None, (5, 6), ())
    assert not steering_power([base, _rec("x", 90.0, (5, 6), ())]).ok
    assert steering_power([base, _rec("x", 90.0, (5, 7), ())]).ok
    assert not steering_power([base, _rec("x", 90.0, (5, 7), ()), _rec("x", 1.0, (5, 6), ())], 2).ok
