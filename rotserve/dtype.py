"""What `--dtype auto` means on this machine: bfloat16 where the CPU computes it natively,
float32 where it does not (there bf16 matmuls run ~5x slower), vLLM's own choice on a GPU;
and what `--device auto` means for the torch-side tools."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")  # what every engine command accepts
# CPU flags that mean bf16 matmuls in hardware (Linux /proc/cpuinfo names).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below its bf16 kernels: a CPU capped there
# computes bf16 the slow way whatever its flags say.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype an engine gets for the one asked for, and why (printed and recorded)."""

    requested: str
    dtype: str
    reason: str

    def describe(self) -> str:
        if self.requested == self.dtype:
            return f"dtype {self.dtype} ({self.reason})"
        return f"dtype {self.requested} -> {self.dtype} ({self.reason})"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags; empty where /proc/cpuinfo is not there."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def choose_dtype(
    requested: str,
    *,
    gpu: bool,
    flags: frozenset[str] | None = None,
    onednn_isa: str | None = None,
) -> DtypeChoice:
    """`requested` unless it is "auto"; then vLLM's choice on a GPU (the checkpoint's dtype),
    bfloat16 on a CPU with native bf16, float32 on any other CPU. `flags`: the CPU's feature
    flags (default: this machine's); `onednn_isa`: oneDNN's cap (default: the environment's
    ONEDNN_MAX_CPU_ISA), which can take native bf16 away."""
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if requested != "auto":
        return DtypeChoice(requested, requested, "asked for")
    if gpu:
        return DtypeChoice("auto", "auto", "GPU: vLLM uses the checkpoint's dtype")
    native = sorted(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    if onednn_isa is None:
        onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    if native and onednn_isa.upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return DtypeChoice(
            "auto",
            "float32",
            f"ONEDNN_MAX_CPU_ISA={onednn_isa} keeps oneDNN below its bf16 kernels, so bfloat16 "
            "would run several times slower than float32; pass --dtype bfloat16 to have it anyway",
        )
    if native:
        return DtypeChoice("auto", "bfloat16", f"this CPU has native bf16: {', '.join(native)}")
    return DtypeChoice(
        "auto",
        "float32",
        "this CPU has no native bf16 (no avx512_bf16, no AMX): bfloat16 would run several "
        "times slower than float32; pass --dtype bfloat16 to have it anyway",
    )


def torch_device(requested: str) -> str:
    """A torch device for "auto" (cuda if visible, else cpu) or the one asked for; ValueError
    when CUDA is asked for and torch sees none."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {requested} but torch sees no CUDA device")
    return requested


def gpu_in_sight() -> bool:
    """Whether an engine started here runs on a GPU (a CUDA torch with a device in sight)."""
    import torch

    return torch.cuda.is_available()
