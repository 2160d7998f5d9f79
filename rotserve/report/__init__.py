"""Reports on grid runs: `make_report(RUN_DIR)` -> summary.csv, summary.md, refusal_polar.png.

- read_rows(RUN_DIR): every finished part file (a partial run works too)
- summarize(rows): per dataset × mode × angle: refusal rate, output tokens, fluency, n
- summary.csv (long form) and summary.md (one wide table per mode)
- polar_plot(summary): refusal rate against angle, the baseline as a dashed circle
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rotserve.report.plot import polar_plot
from rotserve.report.summary import SummaryRow, markdown, short_text, summarize, write_csv
from rotserve.rundir import REPORT_DIR, ROWS_DIR, RunDirError, read_manifest, read_rows

__all__ = ["Report", "SummaryRow", "make_report", "polar_plot", "summarize"]


@dataclass
class Report:
    run_dir: Path
    summary: list[SummaryRow]
    csv_path: Path
    markdown_path: Path
    plot_path: Path
    n_rows: int
    complete: bool

    def short_text(self) -> str:
        head = "" if self.complete else f"(partial run: {self.n_rows} rows so far)\n"
        return head + short_text(self.summary)


def make_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise RunDirError(f"{run_dir}: no manifest.json; not a grid run directory")
    table = read_rows(run_dir)
    if table.num_rows == 0:
        raise RunDirError(f"{run_dir}: no rows yet (no part files in {run_dir / ROWS_DIR})")
    out = Path(out_dir) if out_dir else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(table)
    model = manifest.get("resolved", {}).get("model", "")
    title = f"run {manifest.get('run_id')}: {Path(model).name or model}"
    csv_path = write_csv(rows, out / "summary.csv")
    md_path = out / "summary.md"
    md_path.write_text(markdown(rows, title=title))
    plot_path = polar_plot(
        rows, out / "refusal_polar.png", title=f"refusal rate by angle — {title}"
    )
    expected = (manifest.get("rows") or {}).get("expected")
    return Report(
        run_dir=run_dir,
        summary=rows,
        csv_path=csv_path,
        markdown_path=md_path,
        plot_path=plot_path,
        n_rows=table.num_rows,
        complete=manifest.get("status") == "complete" and table.num_rows == expected,
    )
