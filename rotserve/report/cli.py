"""`python jobs/report.py RUN_DIR` / `rotserve report RUN_DIR`: summarise and plot a grid run."""

from __future__ import annotations

import argparse
import sys

from rotserve.cli import DefaultsFormatter


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
            "a judge with near-constant labels. Works on a partial run too."
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
    return p


def main(argv: list[str] | None = None) -> int:
    from rotserve.report.build import make_report
    from rotserve.rundir import RunDirError

    args = build_parser().parse_args(argv)
    try:
        rep = make_report(args.run_dir, args.out)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
