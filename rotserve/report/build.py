"""make_report: a run directory's rows and verdict tables -> the report files and a Report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rotserve.report.agreement import AgreementReport, agreement_report
from rotserve.report.capability import CapabilityReport, CleanMargins, capability_report
from rotserve.report.plot import polar_plot
from rotserve.report.summary import SummaryRow, markdown, short_text, summarize, write_csv
from rotserve.report.verdicts import (
    VerdictReport,
    shares_markdown,
    verdict_reports,
    write_shares_csv,
)
from rotserve.report.verdicts import short_text as verdict_text
from rotserve.rundir import REPORT_DIR, ROWS_DIR, RunDirError, read_manifest, read_rows


@dataclass
class Report:
    """What make_report wrote, and the summary it wrote it from."""

    run_dir: Path
    summary: list[SummaryRow]
    csv_path: Path
    markdown_path: Path
    plot_path: Path
    n_rows: int
    complete: bool
    verdicts: list[VerdictReport] = field(default_factory=list)  # one per verdict table
    verdicts_csv: Path | None = None
    verdicts_markdown: Path | None = None
    warnings: list[str] = field(default_factory=list)  # verdict tables left out, and why
    agreement: AgreementReport | None = None  # judges side by side, and the judge checks
    # capability circles (rotserve capability) and the refusal / clean ranges per setting
    capability: CapabilityReport | None = None

    @property
    def verdict_plots(self) -> list[Path]:
        return [v.plot_path for v in self.verdicts]

    def short_text(self) -> str:
        head = "" if self.complete else f"(partial run: {self.n_rows} rows so far)\n"
        parts = [head + short_text(self.summary)]
        parts += [verdict_text(v) for v in self.verdicts]
        if self.agreement is not None and self.agreement.short_text():
            parts.append(self.agreement.short_text())
        parts += self.warnings
        if self.capability is not None:
            parts.append(self.capability.short_text())
        return "\n\n".join(parts)


def make_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    margins: CleanMargins | None = None,
) -> Report:
    """Write the report of a run (partial runs too) into out_dir, default RUN_DIR/report;
    margins: what the clean steering range allows (defaults in rotserve.report.capability)."""
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
    capability = capability_report(run_dir, rows, out, title, margins)
    md_path.write_text(markdown(rows, title=title) + "\n" + capability.markdown())
    plot_path = polar_plot(
        rows, out / "refusal_polar.png", title=f"refusal rate by angle — {title}"
    )
    verdicts, warnings = verdict_reports(run_dir, table, out, title)
    verdicts_csv = verdicts_md = None
    if verdicts:
        verdicts_csv = write_shares_csv(
            [s for v in verdicts for s in v.shares], out / "verdicts.csv"
        )
        verdicts_md = out / "verdicts.md"
        verdicts_md.write_text(f"# {title}\n\n" + "\n".join(shares_markdown(v) for v in verdicts))
    agreement = agreement_report(run_dir, table, out) if verdicts else None
    expected = (manifest.get("rows") or {}).get("expected")
    return Report(
        run_dir=run_dir,
        summary=rows,
        csv_path=csv_path,
        markdown_path=md_path,
        plot_path=plot_path,
        n_rows=table.num_rows,
        complete=manifest.get("status") == "complete" and table.num_rows == expected,
        verdicts=verdicts,
        verdicts_csv=verdicts_csv,
        verdicts_markdown=verdicts_md,
        warnings=warnings,
        agreement=agreement,
        capability=capability,
    )
