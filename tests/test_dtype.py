"""`--dtype auto` on this machine: bfloat16 only where the CPU computes it natively.

CPUs without avx512_bf16 or AMX run bf16 matmuls several times slower than float32 (5.2x at
the 0.5B MLP's shape on a 2-core AVX2 EPYC), so there auto is float32. The CPU flags are
passed in (or /proc/cpuinfo is faked): these tests emulate CPUs this machine is not.
"""

from __future__ import annotations

import json

import pytest

from rotserve.dtype import DTYPES, choose_dtype, cpu_flags
from rotserve.paths import toy_model_dir, toy_plane

AVX2_ONLY = frozenset({"avx", "avx2", "fma", "f16c"})  # e.g. a 2-core AMD EPYC of this workplace


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "auto"])
@pytest.mark.parametrize("gpu", [False, True])
def test_an_explicit_dtype_always_wins(dtype, gpu):
    choice = choose_dtype(dtype, gpu=gpu, flags=AVX2_ONLY)
    assert (choice.dtype, choice.reason) == (dtype, "asked for")


def test_auto_is_float32_on_a_cpu_without_native_bf16_emulated_flags():
    choice = choose_dtype("auto", gpu=False, flags=AVX2_ONLY)
    assert choice.dtype == "float32"
    assert "no native bf16" in choice.reason and "--dtype bfloat16" in choice.reason
    assert choice.describe().startswith("dtype auto -> float32 (")


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bfloat16_on_a_cpu_with_native_bf16_emulated_flags(flag):
    choice = choose_dtype("auto", gpu=False, flags=AVX2_ONLY | {flag})
    assert choice.dtype == "bfloat16" and flag in choice.reason


def test_auto_is_float32_where_onednn_is_capped_below_its_bf16_kernels():
    """ONEDNN_MAX_CPU_ISA=AVX2 on a native-bf16 CPU: bf16 matmuls run the slow way, so auto
    means float32 (and this is how an AVX2-only machine is emulated here)."""
    flags = frozenset({"avx2", "avx512_bf16"})
    got = choose_dtype("auto", gpu=False, flags=flags, onednn_isa="AVX2")
    assert got.dtype == "float32" and "ONEDNN_MAX_CPU_ISA=AVX2" in got.reason
    assert choose_dtype("auto", gpu=False, flags=flags, onednn_isa="").dtype == "bfloat16"
    assert choose_dtype("auto", gpu=False, flags=flags, onednn_isa="ALL").dtype == "bfloat16"
    assert choose_dtype("bfloat16", gpu=False, flags=flags, onednn_isa="AVX2").dtype == "bfloat16"


def test_auto_on_a_gpu_is_left_to_vllm():
    assert choose_dtype("auto", gpu=True, flags=AVX2_ONLY).dtype == "auto"


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        choose_dtype("fp8", gpu=False)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_serve_passes_the_resolved_dtype_to_vllm_emulated_avx2_cpu(monkeypatch, capsys):
    from rotserve import dtype
    from rotserve.serve import main

    monkeypatch.setattr(dtype, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr("rotserve.serve.gpu_in_sight", lambda: False)
    args = ["--model", str(toy_model_dir()), "--plane", str(toy_plane()), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr()
    argv = json.loads(out.out)["argv"]
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert "serve: dtype auto -> float32 (this CPU has no native bf16" in out.err
    assert main([*args, "--dtype", "bfloat16"]) == 0  # asked for: it wins
    argv = json.loads(capsys.readouterr().out)["argv"]
    assert argv[argv.index("--dtype") + 1] == "bfloat16"


def test_extract_resolves_auto_and_records_the_dtype_that_ran_emulated_avx2_cpu(
    tiny_qwen2, tmp_path, monkeypatch, capsys
):
    from rotserve import dtype
    from rotserve.extract import ExtractConfig, extract_plane
    from rotserve.plane import load_plane

    monkeypatch.setattr(dtype, "cpu_flags", lambda: AVX2_ONLY)
    out = tmp_path / "plane.safetensors"
    cfg = ExtractConfig(model=str(tiny_qwen2), limit=4, out=str(out), dtype="auto", progress=False)
    extract_plane(cfg)
    assert load_plane(out).meta.method["dtype"] == "float32"
    assert cfg.dtype == "auto"  # the caller's config is left as given
    assert "extract: dtype auto -> float32 (this CPU has no native bf16" in capsys.readouterr().err


def test_extract_refuses_an_unknown_dtype_by_flag():
    from rotserve.extract import ExtractConfig, ExtractionError

    with pytest.raises(ExtractionError, match="--dtype must be one of auto, float32"):
        ExtractConfig(dtype="float64").validate()


def test_selftest_takes_auto_as_grid_and_serve_do():
    from rotserve.selftest import build_parser

    assert build_parser().parse_args([]).dtype == "auto"
