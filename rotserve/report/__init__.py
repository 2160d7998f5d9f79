"""Reports on grid runs: `make_report(RUN_DIR)` -> summary.csv, summary.md, refusal_polar.png.

- read_rows(RUN_DIR): every finished part file (a partial run works too)
- summarize(rows): per dataset × mask × angle: refusal rate, output tokens, fluency, n
- summary.csv (long form) and summary.md (one wide table per mask)
- polar_plot(summary): refusal rate against angle, the baseline as a dashed circle
- every verdict table of the run (rotserve judge): each label's share per dataset × mask ×
  angle (verdicts.csv, verdicts.md), a polar plot per table with one line per label, and
  example generations per label and angle region (report.verdicts)

build.py holds make_report and Report; summary.py, plot.py and verdicts.py the pieces it joins.
"""

from rotserve.report.build import Report, make_report
from rotserve.report.plot import polar_plot
from rotserve.report.summary import SummaryRow, summarize

__all__ = ["Report", "SummaryRow", "make_report", "polar_plot", "summarize"]
