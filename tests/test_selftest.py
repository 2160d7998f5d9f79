"""`rotserve selftest`: bad arguments are usage errors before any engine starts (cheap).

The passing run on real weights is in tests/test_real_weights.py (tiny model + SmolLM2 in
bfloat16); each check's failure is specified in tests/test_canary.py.
"""

from __future__ import annotations

import torch

from rotserve.selftest import main, oracle_parity, steering_power


def test_cuda_without_a_cuda_device_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        return  # a GPU machine: --device cuda is valid there
    assert main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_too_few_tokens_to_reach_a_decode_step_is_a_usage_error(capsys):
    assert main(["--tokens", "2"]) == 2
    assert "--tokens must be >= 3" in capsys.readouterr().err


class _Rec:
    def __init__(self, instruction, angle, tokens, lps):
        self.instruction, self.angle, self.adaptive = instruction, angle, False
        self.prompt, self.prompt_token_ids = instruction, (1, 2)
        self.token_ids, self.logprobs = tokens, lps


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
    rec = _Rec("x", 90.0, (5, 6, 7), (-0.1, -0.2, -0.3))
    assert oracle_parity(_Oracle((5, 6, 7), (-0.1, -0.2, -0.3)), [rec], "float32").ok
    assert not oracle_parity(_Oracle((5, 6, 8), (-0.1, -0.2, -0.3)), [rec], "float32").ok
    assert not oracle_parity(_Oracle((5, 6, 7), (-0.1, -0.2, -0.31)), [rec], "float32").ok
    assert oracle_parity(_Oracle((5, 6, 7), (-0.1, -0.2, -0.6)), [rec], "bfloat16").ok
    assert not oracle_parity(_Oracle((5, 6, 7), (-0.1, -0.2, -0.9)), [rec], "bfloat16").ok


def test_steering_that_changes_no_generation_fails_the_power_check():
    base = _Rec("x", None, (5, 6), ())
    assert not steering_power([base, _Rec("x", 90.0, (5, 6), ())]).ok
    assert steering_power([base, _Rec("x", 90.0, (5, 7), ())]).ok
