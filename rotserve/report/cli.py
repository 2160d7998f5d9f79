"""`python jobs/report.py RUN_DIR` / `rotserve report RUN_DIR`: summarise and plot a grid run."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from rotserve.cli import DefaultsFormatter

if TYPE_CHECKING:
    from rotserve.report.capability import CleanMargins


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Summarise a grid run directory: per dataset, mask and angle, the refusal rate, mean "
            "output tokens, mean fluency and n, as summary.csv and summary.md, plus a polar plot "
            "of refusal rate against angle (refusal_polar.png); for every verdict table of `rotserve "
            "judge`, each label's share per angle (verdicts.csv, verdicts.md), a polar plot per "
            "judge (verdicts_<name>_polar.png) and example generations per label "
            "(verdicts_<name>_examples.md); with two or more tables, their agreement on the "
            "shared axis (agreement.md, agreement.csv: kappa per dataset and angle region, the "
            "rows they disagree on most, each judge against a human audit) and checks that flag "
            "a judge with near-constant labels; for every capability table of `rotserve "
            "capability`, a polar plot per task of its primary metric against angle "
            "(capability_<task>_polar.png); and per plane, window and mask the refusal range, "
            "the clean steering range and their overlap (in summary.md). Works on a partial run "
            "too."
        ),
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by the grid job")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where to write the report (default: RUN_DIR/report)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the paths, not the summary")
    add_range_flags(p)
    return p


def add_range_flags(p: argparse.ArgumentParser) -> None:
    """The clean-range flags (also on `rotserve grid`, whose report follows the grid)."""
    from rotserve.report.capability import DEFAULT_NLL_MARGIN, DEFAULT_SCORE_MARGIN

    g = p.add_argument_group(
        "the clean steering range",
        "An angle is clean when every dataset's coherence (mean NLL per token of its generations "
        "under the unsteered model) and every capability task's primary metric stay within a "
        "margin of their unsteered baseline; getting better never counts against it. The "
        "refusal range is where the refusal dataset's refusal rate is below 50%; the overlap "
        "is both.",
    )
    g.add_argument(
        "--clean-nll-margin",
        type=float,
        default=DEFAULT_NLL_MARGIN,
        metavar="NATS",
        help="how far a dataset's mean NLL per token may rise above its baseline: 0.5 nats is "
        "perplexity x1.65, well above the ~0.1-nat noise of a cell's mean over a hundred "
        "generations and well below the several nats broken text adds",
    )
    g.add_argument(
        "--clean-score-margin",
        type=float,
        default=DEFAULT_SCORE_MARGIN,
        metavar="DROP",
        help="how far a capability task's primary metric may drop below its baseline, on the "
        "metric's scale: 0.05 is 5 points of accuracy, about one standard error of a "
        "100-item benchmark (tinyBenchmarks), so smaller drops are not told from noise",
    )
    g.add_argument(
        "--refusal-dataset",
        default=None,
        metavar="LABEL",
        help="the prompt set whose refusal rate makes the refusal range (default: `harmful` "
        "if the run has it, else its first)",
    )


def margins_from_args(args: argparse.Namespace) -> CleanMargins:
    from rotserve.report.capability import CleanMargins

    for flag in ("clean_nll_margin", "clean_score_margin"):
        if getattr(args, flag) < 0:
            raise ValueError(
                f"--{flag.replace('_', '-')} must be >= 0 (a margin), got {getattr(args, flag)}"
            )
    return CleanMargins(
        nll_margin=args.clean_nll_margin,
        score_margin=args.clean_score_margin,
        refusal_dataset=args.refusal_dataset,
    )


def main(argv: list[str] | None = None) -> int:
    from rotserve.report.build import make_report
    from rotserve.rundir import RunDirError

    args = build_parser().parse_args(argv)
    try:
        rep = make_report(args.run_dir, args.out, margins_from_args(args))
    except (FileNotFoundError, ValueError, RunDirError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(rep.short_text())
        print()
    print(f"summary  {rep.csv_path}\n         {rep.markdown_path}\nplot     {rep.plot_path}")
    if rep.verdicts_markdown is not None:
        print(f"verdicts {rep.verdicts_csv}\n         {rep.verdicts_markdown}")
        for v in rep.verdicts:
            print(f"         {v.plot_path}\n         {v.examples_path}")
    if rep.agreement is not None and rep.agreement.markdown_path is not None:
        print(f"judges   {rep.agreement.markdown_path}\n         {rep.agreement.csv_path}")
    if rep.capability is not None and rep.capability.circles:
        print("capability " + "\n           ".join(str(p) for p in rep.capability.circles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
