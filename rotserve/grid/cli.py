"""The grid's command-line flags: what to generate and where its rows go, as a GridConfig.

`rotserve grid` (rotserve.pipeline) adds the judge and report steps that follow a grid. Every
input is checked before Ray or vLLM start (rotserve.grid.config.resolve).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rotserve.cli import DefaultsFormatter, non_negative_int, positive_int
from rotserve.dtype import DTYPES
from rotserve.fanout.cli import add_execution_args, execution_from_args
from rotserve.grid.config import (
    DEFAULT_ANGLE_COUNT,
    MASKS,
    GridConfig,
    GridConfigError,
    evenly_spaced,
    parse_angle_count,
    parse_angle_list,
    parse_prompt_set,
)
from rotserve.paths import PLANE_FILENAME


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a GridConfigError into argparse's own error format (exit status 2, usage line)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except GridConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    """Every grid flag; defaults are read from GridConfig(), the one source of them."""
    p = argparse.ArgumentParser(
        description=(
            "Generate every prompt at every steering angle (plus an unsteered baseline) with "
            "vLLM engines fanned out on Ray, write one Parquet row per (prompt, angle, sample) "
            "to RUN_DIR/rows/, score refusals, and write a per-angle report with a polar plot. "
            "Rerunning the same command resumes an interrupted run."
        ),
        formatter_class=DefaultsFormatter,
    )
    d = GridConfig()
    _model_args(p.add_argument_group("what to steer"), d)
    _sweep_args(p.add_argument_group("what to generate"), d)
    _output_args(p.add_argument_group("output"), d)
    add_execution_args(p)
    return p


def _model_args(g: argparse._ArgumentGroup, d: GridConfig) -> None:
    g.add_argument(
        "--model",
        default=d.model,
        help="HF model directory or hub id (default: the shipped toy refusal model, %(default)s)",
    )
    g.add_argument(
        "--revision",
        default=None,
        help="hub revision (branch, tag or commit) of --model (default: the hub's default branch)",
    )
    g.add_argument(
        "--plane",
        action="append",
        default=None,
        metavar="[NAME=]FILE",
        help=f"steering plane .safetensors; repeat as NAME=FILE to sweep several planes in one "
        f"run (rows carry the plane's name) (default: MODEL/{PLANE_FILENAME}, the model's own)",
    )
    g.add_argument(
        "--layers",
        action="append",
        default=None,
        metavar="WINDOW",
        help="a layer window to steer: all, a:b (a Python slice, negatives from the end), a "
        "list like 3,4,-1, or selective (per plane, the layers where the mean harmful and "
        "harmless activations project on b1 with opposite signs, from the extraction "
        "statistics in the plane file); repeat to sweep several windows in one run; write "
        "--layers=-2: for a window that starts with '-' (default: all)",
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=d.dtype,
        help="model dtype in vLLM (auto: bfloat16 on a CPU with native bf16, float32 on other "
        "CPUs, the checkpoint's dtype on a GPU; each engine records its choice in the manifest)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run vLLM without torch.compile and CUDA graphs: the engine starts sooner but "
        "generates slower; for short grids and debugging",
    )


def _sweep_args(g: argparse._ArgumentGroup, d: GridConfig) -> None:
    default_prompts = " ".join(f"{k}={v}" for k, v in d.prompts)
    g.add_argument(
        "--prompts",
        action="append",
        default=None,
        type=_arg(parse_prompt_set),
        metavar="LABEL=FILE",
        help=f"a prompt set (.jsonl/.json/.csv/.parquet/.txt); repeat for several; LABEL names the "
        f"dataset column (default: {default_prompts})",
    )
    g.add_argument(
        "--column",
        default=None,
        help="instruction column in the prompt files (default: auto-detect)",
    )
    angles = g.add_mutually_exclusive_group()
    angles.add_argument(
        "--angles",
        type=_arg(parse_angle_count),
        default=None,
        metavar="N",
        help=f"N angles evenly spaced from 0°, 360/N apart "
        f"(default: {len(d.angles)}, i.e. every {360 / len(d.angles):g}°)",
    )
    angles.add_argument(
        "--angle-list",
        type=_arg(parse_angle_list),
        default=None,
        metavar="DEG,DEG,...",
        help="explicit angles in degrees, e.g. 0,90,180,270, folded into [0, 360) "
        "(default: none, --angles sets the grid)",
    )
    g.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the unsteered rows (angle null); by default every prompt is also "
        "generated once without steering",
    )
    g.add_argument(
        "--mask",
        "--mode",  # the flag's earlier name, kept so existing command lines still run
        dest="mask",
        choices=MASKS,
        default=d.mask,
        help="which tokens rotate: plain rotates every token; adaptive only tokens with "
        "h·b1 > 0 (the reference's evaluations, keeps outputs fluent); both runs the grid "
        "with each mask (rows say which in their `adaptive` column). Plain by default: it "
        "shows the toy model's whole circle (harmless prompts refused near 0° too)",
    )
    g.add_argument(
        "--max-tokens",
        type=positive_int("--max-tokens"),
        default=d.max_tokens,
        help="tokens generated per row (the reference evaluations use 512 on real models)",
    )
    g.add_argument(
        "--temperature", type=float, default=d.temperature, help="sampling temperature; 0 = greedy"
    )
    g.add_argument(
        "--seed",
        type=non_negative_int("--seed"),
        default=d.seed,
        help="sampling seed (per request; sample k uses seed+k)",
    )
    g.add_argument(
        "--samples-per-prompt",
        type=positive_int("--samples-per-prompt"),
        default=d.samples_per_prompt,
        help="rows per (prompt, angle); only useful with --temperature > 0",
    )
    g.add_argument(
        "--no-coherence",
        dest="coherence",
        action="store_false",
        help="skip the nll/perplexity columns (each generation scored by the unsteered model "
        "in one extra batch of prefills per shard)",
    )


def _output_args(o: argparse._ArgumentGroup, d: GridConfig) -> None:
    o.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="run directory (default: runs/grid-<run id>, the run id hashing every setting that "
        "changes the rows, so the same command resumes the same directory)",
    )
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="if --out holds a different run, delete its rows, manifest and report first",
    )
    o.add_argument(
        "--shard-size",
        type=positive_int("--shard-size"),
        default=d.shard_size,
        help="prompt × angle requests per generate call and per part file (the unit of resume)",
    )


def config_from_args(args: argparse.Namespace) -> GridConfig:
    if args.angle_list is not None:
        angles = args.angle_list
    else:
        angles = evenly_spaced(args.angles or DEFAULT_ANGLE_COUNT)
    # Only what the user gave: every other field keeps GridConfig's default.
    given = {"prompts": tuple(args.prompts)} if args.prompts else {}
    return GridConfig(
        **given,
        model=args.model,
        revision=args.revision,
        **_plane_fields(args.plane),
        windows=tuple(args.layers or ()),
        column=args.column,
        angles=angles,
        baseline=args.baseline,
        mask=args.mask,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        samples_per_prompt=args.samples_per_prompt,
        coherence=args.coherence,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        shard_size=args.shard_size,
        out=args.out,
        overwrite=args.overwrite,
        execution=execution_from_args(args),
    )


def _plane_fields(values: list[str] | None) -> dict[str, Any]:
    """--plane FILE (one plane) or --plane NAME=FILE ... (a sweep) as GridConfig fields."""
    from rotserve.steering import RotServeConfigError, plane_options

    if not values:
        return {"plane": None}
    try:
        plane, planes = plane_options(values)
    except RotServeConfigError as e:
        raise GridConfigError(str(e)) from None
    if planes is None:
        return {"plane": plane}
    return {"plane": None, "planes": tuple(planes.items())}
