"""`rotserve selftest`: bad arguments are usage errors before any engine starts (cheap).

The passing run on real weights is in tests/test_real_weights.py (tiny model + SmolLM2 in
bfloat16); each check's failure is specified in tests/test_canary.py and tests/test_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from rotserve.selftest import main


def test_cuda_without_a_cuda_device_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: --device cuda is valid there")
    assert main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_too_few_tokens_to_reach_a_decode_step_is_a_usage_error(capsys):
    assert main(["--tokens", "2"]) == 2
    assert "--tokens must be >= 3" in capsys.readouterr().err
