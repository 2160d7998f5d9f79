"""`rotserve graphcheck`: the rotation state under torch.compile and CUDA-graph replay, torch only.

What a steered vLLM engine relies on, checked with plain PyTorch and no vLLM, at a real model's
shapes: the per-token table is a buffer that compiled code reads as a graph input (mutating it
in place changes the output, with no recompile), and a CUDA graph captured with the identity
table follows the table when it is refilled in place before each replay (vLLM's FULL graph
mode replays exactly that way). The model is a stack of decoder-shaped blocks (RMSNorm,
rotation, MLP) over the same RotationState and RequestRows the plugin uses.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rotserve.dtype import torch_device
from rotserve.steering.catalog import PlaneCatalog
from rotserve.steering.request import RequestSteering
from rotserve.steering.table import RequestRows, RotationState

SITE = "input_layernorm"

DESCRIPTION = """\
`rotserve graphcheck`: does the rotation state survive torch.compile and CUDA-graph replay here?

    python -m rotserve.graphcheck                       # on a GPU: real shapes, bf16, ~1 min
    python -m rotserve.graphcheck --device cpu --hidden 64 --layers 2 --tokens 32

Plain PyTorch, no vLLM: run it on any CUDA machine before installing the rest. It builds a
stack of decoder-shaped blocks whose norms are rotated through rotserve's RotationState
(K planes, a gate per layer), then checks:

- compiled reads the table: torch.compile the model once, with the identity table; refill the
  table in place for a mixed batch (several angles, planes, windows, unsteered rows); the
  compiled output equals the eager output for that table, and nothing recompiled;
- CUDA graph follows the table (CUDA only): capture the compiled model with the identity
  table, refill in place, replay; the output equals eager for each of several refills;
- steering changed the output (the checks have power).

It prints one line per check and writes a JSON report (--json). Exit 1 names each failed
check; 0 means the table is a live input to compiled and captured code on this stack.
"""


@dataclass(frozen=True)
class Shapes:
    hidden: int = 3584  # Qwen2.5-7B
    layers: int = 4
    tokens: int = 512  # tokens of one flattened batch (a prefill chunk plus decodes)
    requests: int = 8
    planes: int = 2
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class GraphCheck:
    name: str
    ok: bool
    detail: str
    max_abs_diff: float | None = None


@dataclass
class GraphCheckReport:
    device: str
    torch: str
    shapes: Shapes
    backend: str
    checks: list[GraphCheck] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    gpu: str | None = None
    cuda: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


class Block(nn.Module):
    """One decoder layer's shape, reduced to what touches the rotation: RMSNorm, the rotated
    normalised output (gate = this layer), an MLP back into the residual stream."""

    def __init__(self, hidden: int, rotation: RotationState, gate: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.up = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down = nn.Linear(2 * hidden, hidden, bias=False)
        self.rotation = rotation
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        normed = (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype) * self.weight
        return x + self.down(torch.nn.functional.silu(self.up(self.rotation(normed, self.gate))))


class TinyDecoder(nn.Module):
    def __init__(self, shapes: Shapes, rotation: RotationState) -> None:
        super().__init__()
        self.rotation = rotation
        self.blocks = nn.ModuleList(Block(shapes.hidden, rotation, i) for i in range(shapes.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def catalog(shapes: Shapes) -> PlaneCatalog:
    """K planes and one steerable norm per block, every layer steered by default."""
    layers = tuple(range(shapes.layers))
    return PlaneCatalog(
        names=tuple(f"plane{k}" for k in range(shapes.planes)),
        ids=tuple(f"id{k}" for k in range(shapes.planes)),
        num_layers=shapes.layers,
        steerable=tuple((i, SITE) for i in layers),
        default_layers=layers,
        default_sites=(SITE,),
        slots=shapes.planes,
    )


def build(shapes: Shapes, device: str, seed: int = 0) -> tuple[TinyDecoder, RequestRows]:
    """The model over one RotationState (K random orthonormal float32 planes, a gate per
    block) and the request rows that fill its table, as the plugin builds them."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(shapes.hidden, 2 * shapes.planes, generator=g))
    bases = q.T.reshape(shapes.planes, 2, shapes.hidden).contiguous()
    rotation = RotationState(bases, shapes.tokens, num_gates=shapes.layers)
    model = TinyDecoder(shapes, rotation)
    with torch.no_grad():
        for block in model.blocks:
            nn.init.normal_(block.up.weight, std=shapes.hidden**-0.5, generator=g)
            nn.init.normal_(block.down.weight, std=(2 * shapes.hidden) ** -0.5, generator=g)
    model = model.to(device)
    dtype = getattr(torch, shapes.dtype)
    for (
        block
    ) in model.blocks:  # the weights in the activation dtype, the rotation's buffers float32
        block.weight.data = block.weight.data.to(dtype)
        block.up.to(dtype)
        block.down.to(dtype)
    return model, RequestRows(shapes.requests, device, catalog=catalog(shapes))


def mixed_batch(shapes: Shapes, step: int) -> list[RequestSteering]:
    """A different mixed batch per refill: request 0 unsteered, the others at their own
    angle, mode, plane and layer window."""
    batch = [RequestSteering()]
    for r in range(1, shapes.requests):
        lo = (r + step) % shapes.layers
        batch.append(
            RequestSteering(
                angle=(37.0 * (r + 1) + 71.0 * step) % 360.0,
                adaptive=bool((r + step) % 2),
                plane=f"plane{(r + step) % shapes.planes}",
                window=f"{lo}:{lo + 1 + r % shapes.layers}",
            )
        )
    return batch


def query_start_loc(shapes: Shapes, device: str) -> torch.Tensor:
    """Tokens shared evenly among the requests (the last takes the remainder)."""
    share = shapes.tokens // shapes.requests
    ends = [share * (r + 1) for r in range(shapes.requests - 1)] + [shapes.tokens]
    return torch.tensor([0, *ends], device=device)


def activations(shapes: Shapes, bases: torch.Tensor, device: str) -> torch.Tensor:
    """Random activations with half their energy inside the planes, as a refusal direction
    carries a large share of a harmful prompt's activation: rotating them moves the output
    well above the rounding noise of half-precision kernels."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shapes.tokens, shapes.hidden, generator=g)
    coords = torch.randn(shapes.tokens, bases.shape[0] * 2, generator=g)
    in_plane = coords @ bases.reshape(-1, shapes.hidden).cpu()
    x = x + in_plane * (shapes.hidden / (2 * bases.shape[0])) ** 0.5
    return x.to(device=device, dtype=getattr(torch, shapes.dtype))


def run(
    shapes: Shapes, device: str, backend: str = "inductor", refills: int = 3
) -> GraphCheckReport:
    """Every check on `device`; CUDA graphs only where device is cuda."""
    torch.manual_seed(0)
    report = GraphCheckReport(device, torch.__version__, shapes, backend)
    if device.startswith("cuda"):
        report.gpu = torch.cuda.get_device_name(device)
        report.cuda = torch.version.cuda
    model, rows = build(shapes, device)
    qsl = query_start_loc(shapes, device)
    rotation = model.rotation
    x = activations(shapes, rotation.bases, device)

    def fill(step: int) -> None:
        for slot, steering in enumerate(mixed_batch(shapes, step)):
            rows.set(slot, steering)
        rotation.fill(rows, qsl, shapes.tokens)

    @torch.no_grad()
    def eager_for(step: int) -> torch.Tensor:
        fill(step)
        return model(x).clone()

    rotation.set_identity()
    with torch.no_grad():
        unsteered = model(x).clone()
    expected = [eager_for(step) for step in range(refills)]
    follows = Follows(expected, unsteered, strict=shapes.dtype == "float32")
    power = min(follows.distances)
    report.checks.append(
        GraphCheck(
            "steering changes the output",
            power > 1e-3,
            f"RMS distance between the eager outputs of different tables at least {power:.3g} "
            "(must exceed 1e-3)",
            power,
        )
    )

    compiles = _CompileCounter(backend)
    compiled = torch.compile(model, backend=compiles, fullgraph=True, dynamic=False)
    rotation.set_identity()
    with torch.no_grad():
        compiled(x)
    outs = []
    for step in range(refills):
        fill(step)
        with torch.no_grad():
            outs.append(compiled(x).clone())
    ok, detail, worst = follows.judge(outs)
    report.checks.append(
        GraphCheck(
            "compiled code reads the table as an input",
            ok and compiles.count == 1,
            f"compiled once with the identity table, then {refills} in-place refills: {detail}; "
            f"graphs compiled: {compiles.count} (must be 1)",
            worst,
        )
    )

    if device.startswith("cuda"):
        report.checks.append(_cuda_graph_check(compiled, x, rotation, fill, follows))
        report.timings_ms.update(_cuda_timings(compiled, x, rotation, fill))
    return report


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).pow(2).mean().sqrt().item()


class Follows:
    """Whether outputs follow the table they were run with: each output is nearer its own
    eager reference than a tenth of the distance to any other table's reference (unsteered
    included), in RMS over every element. A max over elements would not do in half precision:
    compiled kernels round some elements a bf16 step away from eager ones (0.0625 at a
    magnitude of 8), which is noise, not a stale table. float32 (strict) also needs every
    element within 1e-4."""

    def __init__(self, expected: list[torch.Tensor], unsteered: torch.Tensor, strict: bool):
        self.expected = expected
        self.others = [[unsteered, *expected[:i], *expected[i + 1 :]] for i in range(len(expected))]
        self.distances = [
            min(_rms(e, o) for o in others) for e, others in zip(expected, self.others, strict=True)
        ]
        self.strict = strict

    def judge(self, outs: list[torch.Tensor]) -> tuple[bool, str, float]:
        ratios = [
            _rms(o, e) / d for o, e, d in zip(outs, self.expected, self.distances, strict=True)
        ]
        worst_abs = max(
            (o.float() - e.float()).abs().max().item()
            for o, e in zip(outs, self.expected, strict=True)
        )
        ok = max(ratios) < 0.1 and (not self.strict or worst_abs <= 1e-4)
        detail = (
            f"RMS distance to the eager output of the same table / to the nearest other table "
            f"at most {max(ratios):.3g} (must be < 0.1); max |diff| {worst_abs:.3g}"
            + (" (must be <= 1e-4 in float32)" if self.strict else "")
        )
        return ok, detail, max(ratios)


class _CompileCounter:
    """A torch.compile backend that counts the graphs it is given, then hands them on."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.count = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.count += 1
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend)(gm, example_inputs)


def _cuda_graph_check(
    compiled: Callable,
    x: torch.Tensor,
    rotation: RotationState,
    fill: Callable[[int], None],
    follows: Follows,
) -> GraphCheck:
    rotation.set_identity()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm-up outside capture, as vLLM does
            compiled(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = compiled(x)
    outs = []
    for step in range(len(follows.expected)):
        fill(step)  # in place, between replays: what V2's prepare_inputs does
        graph.replay()
        torch.cuda.synchronize()
        outs.append(out.clone())
    ok, detail, worst = follows.judge(outs)
    return GraphCheck(
        "CUDA graph replay follows the table",
        ok,
        f"captured with the identity table, refilled in place {len(outs)} times: {detail}",
        worst,
    )


def _cuda_timings(
    compiled: Callable, x: torch.Tensor, rotation: RotationState, fill: Callable[[int], None]
) -> dict[str, float]:
    """Milliseconds per replay with and without the per-step refill: what the table costs."""
    graph = torch.cuda.CUDAGraph()
    rotation.set_identity()
    with torch.cuda.graph(graph), torch.no_grad():
        compiled(x)

    def per_call(fn: Callable[[], None], n: int = 50) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t0) / n

    replay = per_call(graph.replay)
    refill_replay = per_call(lambda: (fill(1), graph.replay()))
    return {"replay": replay, "refill_and_replay": refill_replay}


def build_parser() -> argparse.ArgumentParser:
    from rotserve.cli import DefaultsFormatter

    class Formatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    d = Shapes()
    p = argparse.ArgumentParser(
        prog="rotserve graphcheck", description=DESCRIPTION, formatter_class=Formatter
    )
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto: cuda if visible")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size (7B: 3584)")
    p.add_argument("--layers", type=int, default=d.layers, help="rotated blocks")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens in the flattened batch")
    p.add_argument("--requests", type=int, default=d.requests, help="requests in the batch")
    p.add_argument("--planes", type=int, default=d.planes, help="planes held (K)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="activation dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend (inductor as vLLM uses; aot_eager to skip code generation)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the report here as JSON (default: print only)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = torch_device(args.device)
    except ValueError as e:
        print(f"graphcheck: error: {e}", file=sys.stderr)
        return 2
    if args.requests < 2 or args.tokens < args.requests:
        print("graphcheck: error: need --requests >= 2 and --tokens >= --requests", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    shapes = Shapes(args.hidden, args.layers, args.tokens, args.requests, args.planes, dtype)
    print(
        f"rotserve graphcheck: torch {torch.__version__} on {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.startswith('cuda') else ''}"
        f", {platform.machine()}; {shapes}",
        flush=True,
    )
    report = run(shapes, device, args.backend)
    for c in report.checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    if not device.startswith("cuda"):
        print("  skip  CUDA graph replay follows the table: no CUDA device here")
    for name, ms in report.timings_ms.items():
        print(f"  time  {name}: {ms:.3f} ms")
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
        print(f"report: {args.json}")
    if not report.ok:
        failed = [c.name for c in report.checks if not c.ok]
        print(f"graphcheck: FAIL: {'; '.join(failed)}", file=sys.stderr)
        return 1
    print("graphcheck: PASS: the rotation table is a live input to compiled and captured code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
