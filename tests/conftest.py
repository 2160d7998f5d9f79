"""Shared fixtures: tiny models made by the project's own code, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep vLLM engines small and quiet on a 2-core machine; set before vLLM is imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "data" / "toy-refusal"


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A random-weight 2-layer Qwen2 (hidden 128, head size 32) with a chat template."""
    from rotserve.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from rotserve.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1)


@pytest.fixture(scope="session")
def tiny_plane(tmp_path_factory, tiny_qwen2) -> Path:
    """A random orthonormal plane that fits tiny_qwen2, saved as a plane file."""
    from rotserve.plane import random_plane

    path = tmp_path_factory.mktemp("plane") / "tiny.safetensors"
    return random_plane(128, seed=7, model=str(tiny_qwen2)).save(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: intra-op threads cost more than they gain, badly so on a busy 2-core box.
    A module opts in with a module-scoped autouse fixture that requests it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_cluster(request):
    """A local 2-CPU Ray cluster for the module; stand-ins defined in the test module travel to
    the actors by value (Ray workers cannot import a test module)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(request.module)
    yield ray
    ray.shutdown()
