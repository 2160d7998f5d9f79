"""The rotation op alone, against a plain copy of the same activations (its floor).

The rotation reads every activation to get its two in-plane coordinates and writes every
activation back, so no implementation can beat one read plus one write of [tokens, hidden]:
that is what `h.clone()` costs (clone, not copy_ into a buffer, because `rotate` returns a
fresh tensor too). `rotation_vs_copy` is time(best shipped rotation variant) / time(clone).

Variants:
- `rotate` from rotserve.rotation, eager and under torch.compile (vLLM compiles the model
  that calls it, so the compiled number is the one that runs in the engine);
- `rotate_matmul`, the same semantics written with two matmuls ([N,H]x[H,2], [N,2]x[2,H]),
  rotation.py's earlier formulation (it now uses row sums and broadcasts, which Inductor
  fuses into one kernel per row). Checked against `rotate` (inactive tokens bit-identical,
  active ones equal to float32 rounding) before it is timed;
- `rmsnorm_compiled`, for scale only: the norm every steered site already runs (also one
  reduction and one update per row) is what a per-row float32 op costs on this CPU.

Each timed call is timed on its own and a block reports the median call: a call that lands
on freshly mapped memory (glibc returns large freed blocks to the OS, so the next allocation
page-faults) would otherwise dominate a short block, and it says nothing about the op.

Standalone calls of a compiled function also pay torch.compile's Python entry (guards,
wrapper: ~20 us), which inside vLLM's single compiled graph does not exist. So the "in graph"
measurement compiles a stack of `sites` RMSNorms, each followed by the rotation or not, and
reports the marginal cost per steered site: the number to compare with an engine step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from benchmarks.child import child_env
from rotserve.rotation import (
    ACTIVE,
    ADAPTIVE,
    COS,
    RELATIVE,
    SIN,
    angle_table,
    rotate,
    rotate_planes,
)

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EPS = 1e-6


def rotate_matmul(h: torch.Tensor, basis: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Same math as rotserve.rotation.rotate, written with two matmuls ([N,H]x[H,2] for the
    in-plane coordinates, [N,2]x[2,H] for the update): rotation.py's first formulation, kept
    here as the alternative to compare against."""
    x = h.float()
    coords = x @ basis.t()  # [N, 2]: (h·b1, h·b2)
    p1, p2 = coords[:, 0], coords[:, 1]
    cos, sin, relative = table[:, COS], table[:, SIN], table[:, RELATIVE]
    r = torch.sqrt(p1 * p1 + p2 * p2)
    t1 = relative * (p1 * cos - p2 * sin) + (1.0 - relative) * (r * cos)
    t2 = relative * (p1 * sin + p2 * cos) + (1.0 - relative) * (r * sin)
    leaning = (p1 > 0).to(x.dtype)
    mask = table[:, ACTIVE] * (1.0 - table[:, ADAPTIVE] * (1.0 - leaning))
    delta = torch.stack([t1 - p1, t2 - p2], dim=1) @ basis  # [N, H]
    out = (x + delta).to(h.dtype)
    return torch.where(mask[:, None] > 0, out, h)


def _rmsnorm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = h.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight).to(h.dtype)


def _clone(h: torch.Tensor, basis: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return h.clone()


def make_inputs(
    tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations, an orthonormal basis and a table mixing every kind of row.

    Most rows are active with distinct angles (the grid case); some are inactive, adaptive
    or relative, so the check below covers every branch of the math.
    """
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype)
    q, _ = torch.linalg.qr(torch.randn(hidden, 2, generator=g))
    basis = q.t().contiguous().float()
    degrees: list[float | None] = [float((5 * i) % 360) for i in range(tokens)]
    for i in range(0, tokens, 7):
        degrees[i] = None  # inactive: must come back bit-identical
    adaptive = [i % 3 == 0 for i in range(tokens)]
    relative = [i % 5 == 0 for i in range(tokens)]
    table = angle_table(degrees, adaptive=adaptive, relative=relative)
    return h, basis, table


def check_same_semantics(fn: Fn, tokens: int = 512, hidden: int = 896) -> dict[str, Any]:
    """fn against rotserve.rotation.rotate: bit-identical untouched rows, close active rows."""
    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, basis, table = make_inputs(tokens, hidden, dtype, seed=1)
        ref, got = rotate(h, basis, table), fn(h, basis, table)
        untouched = torch.isclose(ref.float(), h.float(), rtol=0, atol=0).all(1)
        inactive = table[:, ACTIVE] == 0
        if not torch.equal(got[inactive], h[inactive]):
            raise AssertionError(f"{dtype}: inactive tokens changed")
        if not torch.equal(got[untouched], ref[untouched]):
            raise AssertionError(f"{dtype}: tokens left alone by rotate were changed")
        err = (got.float() - ref.float()).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 0.07  # bf16: one ulp of |h| ~ 4
        if err > tol:
            raise AssertionError(f"{dtype}: max |difference| to rotate {err} > {tol}")
        out[str(dtype).removeprefix("torch.")] = {"max_abs_diff_vs_rotate": err}
    return out


def _alternating_medians(
    calls: dict[str, Any], rounds: int, block_seconds: float
) -> dict[str, float]:
    """Median seconds per call of each contender: two warm-up calls each, then rounds in
    alternating order (A B, then B A) so that machine drift cancels."""
    for fn in calls.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(_median_call(calls[name], 3, block_seconds))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _median_call(fn: Callable[[], Any], min_calls: int, min_seconds: float) -> float:
    """Median seconds of individually timed calls (at least min_calls, about min_seconds)."""
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure_op(
    shapes: Sequence[tuple[int, int]],
    dtypes: Sequence[torch.dtype],
    rounds: int,
    block_seconds: float,
    compile_variants: bool,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    variants: dict[str, Fn] = {
        "copy": _clone,
        "rotate_eager": rotate,
        "rotate_matmul_eager": rotate_matmul,
    }
    if compile_variants:
        # dynamic=True: vLLM compiles with a symbolic token count, so should the microbench.
        variants["rotate_compiled"] = torch.compile(rotate, dynamic=True)
        variants["rotate_matmul_compiled"] = torch.compile(rotate_matmul, dynamic=True)
        norm = torch.compile(_rmsnorm, dynamic=True)
    else:
        norm = _rmsnorm
    cases = []
    for tokens, hidden in shapes:
        for dtype in dtypes:
            h, basis, table = make_inputs(tokens, hidden, dtype)
            weight = torch.ones(hidden)
            calls: dict[str, Callable[[], Any]] = {
                name: partial(fn, h, basis, table) for name, fn in variants.items()
            }
            norm_name = "rmsnorm_compiled" if compile_variants else "rmsnorm_eager"
            calls[norm_name] = partial(norm, h, weight)
            for fn in calls.values():
                fn()
                fn()  # compile and warm caches outside the timing
            times: dict[str, list[float]] = {name: [] for name in calls}
            names = list(calls)
            for r in range(rounds):
                for name in names if r % 2 == 0 else reversed(names):
                    times[name].append(_median_call(calls[name], 3, block_seconds))
            itemsize = torch.empty((), dtype=dtype).element_size()
            moved = 2 * tokens * hidden * itemsize  # one read + one write: the floor
            case: dict[str, Any] = {
                "tokens": tokens,
                "hidden": hidden,
                "dtype": _dtype_name(dtype),
                "bytes_floor": moved,
                "variants": {},
            }
            for name, ts in times.items():
                med = statistics.median(ts)
                case["variants"][name] = {
                    "us_per_call": med * 1e6,
                    "effective_GBps": moved / med / 1e9,
                    "vs_copy": statistics.median(
                        t / c for t, c in zip(ts, times["copy"], strict=True)
                    ),
                }
            rot = {k: v for k, v in case["variants"].items() if k.startswith("rotate")}
            best = min(rot, key=lambda k: rot[k]["vs_copy"])
            shipped = [k for k in rot if "matmul" not in k]
            best_shipped = min(shipped, key=lambda k: rot[k]["vs_copy"])
            case.update(
                best_variant=best,
                best_vs_copy=rot[best]["vs_copy"],
                best_shipped_variant=best_shipped,
                best_shipped_vs_copy=rot[best_shipped]["vs_copy"],
            )
            log(
                f"  rotation op {tokens}x{hidden} {case['dtype']}: copy "
                f"{case['variants']['copy']['us_per_call']:.1f} us; "
                + ", ".join(
                    f"{k} {v['vs_copy']:.2f}x" for k, v in case["variants"].items() if k != "copy"
                )
            )
            cases.append(case)
    return cases


def _norm_stack(rotate_fn: Fn | None) -> Callable[..., torch.Tensor]:
    """`sites` x (RMSNorm -> [rotation] -> residual add): the shape of a steered forward
    without its matmuls, so the difference with and without rotation is the rotation's
    in-graph cost."""

    def stack(
        x: torch.Tensor, weight: torch.Tensor, basis: torch.Tensor, table: torch.Tensor, sites: int
    ) -> torch.Tensor:
        for _ in range(sites):
            normed = _rmsnorm(x, weight)
            if rotate_fn is not None:
                normed = rotate_fn(normed, basis, table)
            x = x + normed  # keeps every site live and sequential, as in a decoder
        return x

    return stack


def measure_in_graph(
    tokens_list: Sequence[int],
    hidden: int,
    sites: int,
    dtype: torch.dtype,
    rounds: int,
    block_seconds: float,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Marginal cost of the rotation per steered site inside one compiled graph."""
    fns = {
        "norms_only": torch.compile(_norm_stack(None), dynamic=True),
        "norms_rotate": torch.compile(_norm_stack(rotate), dynamic=True),
        "norms_rotate_matmul": torch.compile(_norm_stack(rotate_matmul), dynamic=True),
    }
    out = []
    for tokens in tokens_list:
        h, basis, table = make_inputs(tokens, hidden, dtype)
        weight = torch.ones(hidden)
        calls = {name: partial(fn, h, weight, basis, table, sites) for name, fn in fns.items()}
        med = _alternating_medians(calls, rounds, block_seconds)
        base = med["norms_only"]
        row = {
            "tokens": tokens,
            "hidden": hidden,
            "sites": sites,
            "dtype": _dtype_name(dtype),
            "us_per_stack": {k: v * 1e6 for k, v in med.items()},
            "rotate_us_per_site": (med["norms_rotate"] - base) / sites * 1e6,
            "rotate_matmul_us_per_site": (med["norms_rotate_matmul"] - base) / sites * 1e6,
            "norm_us_per_site": base / sites * 1e6,
        }
        log(
            f"  in graph, {sites} sites x [{tokens}, {hidden}] {row['dtype']}: norm "
            f"{row['norm_us_per_site']:.1f} us/site, + rotate "
            f"{row['rotate_us_per_site']:.1f} us/site (matmul form "
            f"{row['rotate_matmul_us_per_site']:.1f})"
        )
        out.append(row)
    return out


def measure_planes_in_graph(
    tokens_list: Sequence[int],
    hidden: int,
    sites: int,
    dtype: torch.dtype,
    rounds: int,
    block_seconds: float,
    log: Callable[[str], None],
    planes: Sequence[int] = (1, 8),
) -> list[dict[str, Any]]:
    """Per steered site, in one compiled graph: today's single-plane `rotate`, against the
    engine's op `rotate_planes` (plane one-hot + per-site gate) with K planes loaded."""

    def stack(rotate_fn: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor]:
        def run(x: torch.Tensor, weight: torch.Tensor, args: tuple) -> torch.Tensor:
            for _ in range(sites):
                normed = _rmsnorm(x, weight)
                if rotate_fn is not None:
                    normed = rotate_fn(normed, *args)
                x = x + normed
            return x

        return run

    out = []
    for tokens in tokens_list:
        h, basis, table = make_inputs(tokens, hidden, dtype)
        weight = torch.ones(hidden)
        gate = (torch.arange(tokens) % 4 != 1).float()  # a window: some tokens skip the site
        calls: dict[str, Callable[[], Any]] = {
            "norms_only": partial(torch.compile(stack(None), dynamic=True), h, weight, ()),
            "rotate": partial(
                torch.compile(stack(rotate), dynamic=True), h, weight, (basis, table)
            ),
        }
        for k in planes:
            g = torch.Generator().manual_seed(k)
            bases = torch.stack(
                [torch.linalg.qr(torch.randn(hidden, 2, generator=g))[0].t() for _ in range(k)]
            ).contiguous()
            onehot = torch.nn.functional.one_hot(torch.arange(tokens) % k, k).float()
            calls[f"planes_{k}"] = partial(
                torch.compile(stack(rotate_planes), dynamic=True),
                h,
                weight,
                (bases, table, onehot, gate),
            )
        med = _alternating_medians(calls, rounds, block_seconds)
        base = med["norms_only"]
        per_site = {k: (v - base) / sites * 1e6 for k, v in med.items() if k != "norms_only"}
        row = {
            "tokens": tokens,
            "hidden": hidden,
            "sites": sites,
            "dtype": _dtype_name(dtype),
            "us_per_site": per_site,
            "norm_us_per_site": base / sites * 1e6,
            "planes_1_over_rotate": med["planes_1"] / med["rotate"] if "planes_1" in med else None,
        }
        log(
            f"  planes in graph, {sites} sites x [{tokens}, {hidden}] {row['dtype']}: "
            + ", ".join(f"{k} {v:.1f} us/site" for k, v in per_site.items())
            + f" (norm {row['norm_us_per_site']:.1f})"
        )
        out.append(row)
    return out


def measure_rotation_op(
    shapes: Sequence[tuple[int, int]] = ((4096, 896),),
    dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32),
    rounds: int = 7,
    block_seconds: float = 0.1,
    compile_variants: bool = True,
    in_graph_tokens: Sequence[int] = (64, 4096),
    in_graph_sites: int = 48,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time per call of every variant for each (shape, dtype), alternating in rounds."""
    semantics: dict[str, Any] = {"rotate_matmul_eager": check_same_semantics(rotate_matmul)}
    if compile_variants:
        for name, fn in (
            ("rotate_compiled", rotate),
            ("rotate_matmul_compiled", rotate_matmul),
        ):
            semantics[name] = check_same_semantics(torch.compile(fn, dynamic=True))
    cases = measure_op(shapes, dtypes, rounds, block_seconds, compile_variants, log)
    in_graph = (
        measure_in_graph(
            in_graph_tokens,
            shapes[0][1],
            in_graph_sites,
            torch.bfloat16,
            rounds,
            block_seconds,
            log,
        )
        if compile_variants and in_graph_tokens
        else []
    )
    return {
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "semantics_check": semantics,
        "cases": cases,
        "in_graph": in_graph,
    }


# glibc returns freed blocks above its (adaptive) mmap threshold to the OS, so the next
# allocation of that size page-faults on every page: a 4096x896 float32 output then costs
# ~10 ms of faults, far more than the op. Whether that happens depends on the process's
# allocation history, which differed between otherwise identical runs. The microbenchmark
# therefore runs in a child process with the threshold pinned at glibc's maximum (32 MiB) and
# no trimming, so tensors up to 32 MiB are reused from the heap (what tcmalloc, which vLLM
# recommends on CPU, does anyway); bigger ones (the 32768-token case) still fault, for the
# copy as much as for the rotation.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
RESULT_PREFIX = "ROTSERVE_ROTATION_RESULT "


def run_in_child(options: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """measure_rotation_op(**options) in a fresh process with pinned malloc settings."""
    import json
    import subprocess
    import sys

    env = child_env(GLIBC_TUNABLES=GLIBC_TUNABLES)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.rotation_op", json.dumps(options)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
        else:
            log(line)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"rotation benchmark child failed:\n{proc.stderr[-3000:]}")
    result["glibc_tunables"] = GLIBC_TUNABLES
    return result


def _main(argv: Sequence[str]) -> int:
    import json

    options = json.loads(argv[0]) if argv else {}
    if options.pop("planes_only", False):
        # The multi-plane section alone, small: python -m benchmarks.rotation_op
        # '{"planes_only": true, "tokens": [64, 1024], "hidden": 896, "sites": 24}'
        rows = measure_planes_in_graph(
            options.get("tokens", [64, 1024]),
            options.get("hidden", 896),
            options.get("sites", 24),
            getattr(torch, options.get("dtype", "bfloat16")),
            options.get("rounds", 5),
            options.get("block_seconds", 0.1),
            lambda m: print(m, flush=True),
        )
        print(RESULT_PREFIX + json.dumps({"planes_in_graph": rows}), flush=True)
        return 0
    if "shapes" in options:  # JSON made the shape tuples lists
        options["shapes"] = [tuple(s) for s in options["shapes"]]
    result = measure_rotation_op(**options, log=lambda m: print(m, flush=True))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
