"""`python jobs/grid.py` / `rotserve grid`: the angle × prompt grid from the command line.

Every input is checked before Ray or vLLM start (rotserve.grid.config.resolve); errors exit
with status 2 and one line saying what to fix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rotserve.cli import DefaultsFormatter
from rotserve.grid.config import (
    DEFAULT_ANGLE_COUNT,
    DTYPES,
    MODES,
    GridConfig,
    GridConfigError,
    evenly_spaced,
    parse_angle_count,
    parse_angle_list,
    parse_prompt_set,
)
from rotserve.paths import PLANE_FILENAME
from rotserve.rundir import RunDirError

if TYPE_CHECKING:
    from rotserve.grid.result import RunResult
    from rotserve.report import Report


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a GridConfigError into argparse's own error format (exit status 2, usage line)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except GridConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def _positive(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}")
        return value

    return parse


def _non_negative(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a whole number, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    d = GridConfig()  # the one source of defaults
    default_prompts = " ".join(f"{k}={v}" for k, v in d.prompts)
    p = argparse.ArgumentParser(
        description=(
            "Generate every prompt at every steering angle (plus an unsteered baseline) with "
            "vLLM engines fanned out on Ray, write one Parquet row per (prompt, angle, sample) "
            "to RUN_DIR/rows/, score refusals, and write a per-angle report with a polar plot. "
            "Rerunning the same command resumes an interrupted run."
        ),
        formatter_class=DefaultsFormatter,
    )
    g = p.add_argument_group("what to generate")
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
        help="a layer window to steer: all, a:b (a Python slice), a list like 3,4,5, or "
        "selective (per plane, the layers where the mean harmful and harmless activations "
        "project on b1 with opposite signs, from the extraction statistics in the plane "
        "file); repeat to sweep several windows in one run (default: all)",
    )
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
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--mode",
        choices=MODES,
        default=d.mode,
        help="rotation mask: plain rotates every token; adaptive only tokens with h·b1 > 0 (the "
        "reference's evaluations, keeps outputs fluent); both runs the grid in each mode. "
        "Plain by default: it shows the toy model's whole circle (harmless prompts refused "
        "near 0° too)",
    )
    mode.add_argument(
        "--adaptive",
        dest="mode",
        action="store_const",
        const="adaptive",
        help="same as --mode adaptive",
    )
    mode.add_argument(
        "--no-adaptive",
        dest="mode",
        action="store_const",
        const="plain",
        help="same as --mode plain",
    )
    g.add_argument(
        "--max-tokens",
        type=_positive("--max-tokens"),
        default=d.max_tokens,
        help="tokens generated per row (the reference evaluations use 512 on real models)",
    )
    g.add_argument(
        "--temperature", type=float, default=d.temperature, help="sampling temperature; 0 = greedy"
    )
    g.add_argument(
        "--seed",
        type=_non_negative("--seed"),
        default=d.seed,
        help="sampling seed (per request; sample k uses seed+k)",
    )
    g.add_argument(
        "--samples-per-prompt",
        type=_positive("--samples-per-prompt"),
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
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=d.dtype,
        help="model dtype in vLLM (auto: bfloat16 on CPU)",
    )

    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run vLLM without torch.compile and CUDA graphs: the engine starts sooner but "
        "generates slower; for short grids and debugging",
    )

    o = p.add_argument_group("output")
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
        type=_positive("--shard-size"),
        default=d.shard_size,
        help="prompt × angle requests per generate call and per part file (the unit of resume)",
    )
    o.add_argument(
        "--no-report", dest="report", action="store_false", help="skip the summary and plot"
    )
    o.add_argument(
        "--judge",
        default=None,
        metavar="MODEL",
        help="after the grid, judge every row with this judge model (as `rotserve judge`, with "
        "this command's --dtype, --enforce-eager and where-to-run flags) before the report "
        "(default: no judge; the shipped toy judge is data/toy-judge)",
    )
    o.add_argument(
        "--rubric",
        default="behaviour",
        help="the judge's rubric with --judge: behaviour, harmbench, llamaguard or a rubric file",
    )
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    add_execution_args(p, d.cpus_per_engine, d.max_engine_failures)
    return p


def add_execution_args(
    p: argparse.ArgumentParser, cpus_per_engine: int, max_engine_failures: int
) -> None:
    """The "where to run" options, shared by every fan-out command (grid, judge)."""
    r = p.add_argument_group("where to run")
    r.add_argument(
        "--engines",
        type=_positive("--engines"),
        default=None,
        help="vLLM engines (one Ray actor each) (default: one per GPU in the cluster; on CPU, "
        "one per --cpus-per-engine cores, leaving one core for the driver and Ray)",
    )
    r.add_argument(
        "--gpus-per-engine",
        type=_non_negative("--gpus-per-engine"),
        default=None,
        help="GPUs per engine; 0 = CPU engines (default: 1 if the Ray cluster has GPUs, else 0)",
    )
    r.add_argument(
        "--cpus-per-engine",
        type=_positive("--cpus-per-engine"),
        default=cpus_per_engine,
        help="cores per CPU engine (pinned with VLLM_CPU_OMP_THREADS_BIND)",
    )
    r.add_argument(
        "--tensor-parallel-size",
        type=_positive("--tensor-parallel-size"),
        default=None,
        help="tensor parallel degree inside one engine (default: --gpus-per-engine)",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join, e.g. auto or ray://head:10001 (default: start a local cluster)",
    )
    r.add_argument(
        "--max-engine-failures",
        type=_non_negative("--max-engine-failures"),
        default=max_engine_failures,
        help="engine (actor) deaths to survive by re-queueing their shards on a fresh engine",
    )
    r.add_argument("--verbose", action="store_true", help="show Ray and vLLM logs")


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
        mode=args.mode,
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
        progress=args.progress,
        **execution_kwargs(args),
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


EXECUTION_FIELDS = (
    "engines",
    "gpus_per_engine",
    "cpus_per_engine",
    "tensor_parallel_size",
    "ray_address",
    "max_engine_failures",
    "verbose",
)


def execution_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The add_execution_args options, as config fields of the same names."""
    return {name: getattr(args, name) for name in EXECUTION_FIELDS}


def main(argv: list[str] | None = None) -> int:
    """Run the grid, then (unless --no-report) the report on its run directory."""
    from rotserve.grid import run_grid

    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    config = config_from_args(args)
    result, code = run_guarded("grid", lambda: run_grid(config, argv=["grid", *raw]))
    if code:
        return code
    if args.judge:
        code = _judge(args, result.run_dir)
        if code:
            return code
    report = None
    if args.report:
        from rotserve.report import make_report

        report = make_report(result.run_dir)
    print(summary_text(result, report))
    return 0


def run_guarded(
    name: str, job: Callable[[], Any], config_errors: tuple[type[Exception], ...] = ()
) -> tuple[Any, int]:
    """(result, 0), or (None, exit status) with one line on stderr: 2 for a bad request, 1 for
    a failed run (finished parts kept), 130 for Ctrl-C. Shared by the fan-out commands."""
    from rotserve.grid.runner import GridRunError

    try:
        return job(), 0
    except (GridConfigError, RunDirError, *config_errors) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return None, 2
    except GridRunError as e:
        print(
            f"{name}: failed: {e}\nfinished parts are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return None, 1
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return None, 130


def _judge(args: argparse.Namespace, run_dir: Any) -> int:
    """`--judge`: the judge job on the finished run, with this command's engine flags."""
    from rotserve.judge import JudgeConfig, JudgeConfigError, run_judge

    config = JudgeConfig(
        run_dir=str(run_dir),
        judge=args.judge,
        rubric=args.rubric,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        progress=args.progress,
        **execution_kwargs(args),
    )
    verdicts, code = run_guarded("grid: judge", lambda: run_judge(config), (JudgeConfigError,))
    if code:
        return code
    counts = ", ".join(f"{k} {v}" for k, v in verdicts.label_counts.items())
    print(f"verdicts {verdicts.name}: {counts} -> {verdicts.table_dir}", file=sys.stderr)
    return 0


def summary_text(result: RunResult, report: Report | None = None) -> str:
    rows = result.rows_dir
    rate = ""
    if result.rows_per_s:
        rate = f", {result.rows_per_s:.0f} rows/s"
        if result.steady_rows_per_s:
            rate += f" ({result.steady_rows_per_s:.0f} rows/s once the engines were up)"
    lines = [
        f"run {result.run_id}: {result.rows_total} rows in {result.shards_total} "
        f"part file{'s' if result.shards_total != 1 else ''} "
        f"({result.shards_written} written now, {result.shards_skipped} resumed), "
        f"{result.wall_s:.0f} s wall{rate}",
        f"  rows      {rows}/   (pandas/polars: read_parquet('{rows}'); duckdb: "
        f"read_parquet('{rows}/*.parquet'))",
        f"  manifest  {result.manifest_path}",
    ]
    if report is not None:
        rep = report
        lines += [
            f"  summary   {rep.csv_path}  {rep.markdown_path}",
            f"  plot      {rep.plot_path}",
            *(f"  judged    {path}" for path in rep.verdict_plots),
            "",
            rep.short_text(),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
