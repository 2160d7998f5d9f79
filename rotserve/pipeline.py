"""`rotserve grid` / `python jobs/grid.py`: the grid, then optionally a judge, then the report.

The one place that chains the jobs: the grid and the judge know nothing of each other, and
each reads or writes only the run directory (rotserve.rundir).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from rotserve.fanout.cli import execution_from_args, run_guarded
from rotserve.grid import GridConfigError, run_grid
from rotserve.grid.cli import build_parser as grid_parser
from rotserve.grid.cli import config_from_args
from rotserve.judge import JudgeConfig, JudgeConfigError, run_judge
from rotserve.judge.rubrics import BUILTIN

if TYPE_CHECKING:
    from pathlib import Path

    from rotserve.grid import RunResult
    from rotserve.report import Report


def build_parser() -> argparse.ArgumentParser:
    """The grid's flags, plus what follows the grid: a judge and the report."""
    p = grid_parser()
    a = p.add_argument_group("after the grid")
    a.add_argument(
        "--judge",
        default=None,
        metavar="MODEL",
        help="judge every row with this judge model (as `rotserve judge`, with this command's "
        "--dtype, --enforce-eager and where-to-run flags) before the report (default: no "
        "judge; the shipped toy judge is data/toy-judge)",
    )
    a.add_argument(
        "--rubric",
        default="behaviour",
        help=f"the judge's rubric with --judge: {', '.join(BUILTIN)}, or a rubric file",
    )
    a.add_argument(
        "--keyword-table",
        action="store_true",
        help="also write the keyword markers as a verdict table (keyword.markers, as `rotserve "
        "judge keyword`: no model, under a second), so the report sets the judge beside them",
    )
    a.add_argument(
        "--no-report", dest="report", action="store_false", help="skip the summary and plot"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the grid, then (with --judge) the judge, then (unless --no-report) the report."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    config = config_from_args(args)
    job = lambda: run_grid(config, argv=["grid", *raw])  # noqa: E731
    result, code = run_guarded("grid", job, (GridConfigError,))
    if code:
        return code
    if args.judge:
        code = judge_run(args, result.run_dir)
        if code:
            return code
    if args.keyword_table:
        from rotserve.judge.keyword import keyword_verdicts

        kw = keyword_verdicts(result.run_dir, overwrite=True)
        print(f"verdicts {kw.name} -> {kw.table_dir}", file=sys.stderr)
    report = None
    if args.report:
        from rotserve.report import make_report

        report = make_report(result.run_dir)
    print(summary_text(result, report))
    return 0


def judge_run(args: argparse.Namespace, run_dir: Path) -> int:
    """`--judge`: the judge job on the finished run, with the grid's engine flags."""
    config = JudgeConfig(
        run_dir=str(run_dir),
        judge=args.judge,
        rubric=args.rubric,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        execution=execution_from_args(args),
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
            *(
                [f"  judges    {rep.agreement.markdown_path}"]
                if rep.agreement is not None and rep.agreement.markdown_path is not None
                else []
            ),
            "",
            rep.short_text(),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
