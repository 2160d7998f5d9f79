"""Report: summary numbers, refusal arcs, CSV/Markdown/PNG, and the CLI, on a synthetic run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from rotserve.grid.store import RunStore
from rotserve.report import make_report, summarize
from rotserve.report.cli import main
from rotserve.report.summary import refusal_arcs
from rotserve.rundir import to_table


def row(ds: str, angle: float | None, adaptive: bool, refused: bool, i: int) -> dict:
    return {
        "run_id": "r",
        "model": "/models/toy",
        "plane_id": "p",
        "dataset": ds,
        "prompt_id": f"{ds}-{i}",
        "instruction": "x",
        "prompt": "x",
        "category": "",
        "angle": angle,
        "adaptive": adaptive,
        "sample": 0,
        "seed": 0,
        "temperature": 0.0,
        "max_tokens": 8,
        "generation": "I'm sorry" if refused else "Sure thing here you go",
        "prompt_tokens": 3,
        "output_tokens": 2 if refused else 5,
        "finish_reason": "stop",
        "refusal": refused,
        "refusal_marker": "I'm sorry" if refused else None,
        "fluency": 0.5 if refused else 1.0,
        "nll": 1.0 if refused else 2.0,
        "perplexity": math.exp(1.0 if refused else 2.0),
    }


def synthetic_rows() -> list[dict]:
    """harmful refuses at 300°-60° (and at baseline), harmless only at 0° with the plain mask."""
    rows = []
    for i in range(4):
        rows.append(row("harmful", None, False, True, i))
        rows.append(row("harmless", None, False, False, i))
        for mode in (False, True):
            for a in range(0, 360, 30):
                harm = a <= 60 or a >= 300
                rows.append(row("harmful", float(a), mode, harm and (i < 3 or a == 0), i))
                rows.append(row("harmless", float(a), mode, a == 0 and not mode, i))
    return rows


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    store, _ = RunStore.open(tmp_path / "run", "r", overwrite=False)
    rows = synthetic_rows()
    store.write_manifest({"run_id": "r", "status": "complete", "rows": {"expected": len(rows)}})
    store.write_part("00000", to_table(rows[:50]))
    store.write_part("00001", to_table(rows[50:]))
    store.close()
    return store.root


def test_summarize_per_dataset_mode_angle():
    summary = summarize(to_table(synthetic_rows()))
    by = {(s.dataset, s.mask, s.angle): s for s in summary}
    assert len(summary) == 2 * (1 + 2 * 12)
    assert summary[0].mask == "baseline" and summary[0].dataset == "harmful"
    base = by[("harmful", "baseline", None)]
    assert base.n == 4 and base.refusal_rate == 1.0 and base.mean_output_tokens == 2.0
    assert by[("harmful", "plain", 30.0)].refusal_rate == 0.75
    assert by[("harmful", "plain", 180.0)].refusal_rate == 0.0
    assert by[("harmful", "plain", 180.0)].mean_fluency == 1.0
    assert by[("harmful", "plain", 30.0)].mean_nll == (3 * 1.0 + 2.0) / 4
    assert by[("harmful", "plain", 30.0)].perplexity == pytest.approx(math.exp(1.25))
    assert by[("harmless", "plain", 0.0)].refusal_rate == 1.0
    assert by[("harmless", "adaptive", 0.0)].refusal_rate == 0.0


def test_refusal_arcs_wrap_through_zero():
    pts = [(float(a), 1.0 if (a <= 60 or a >= 300) else 0.0) for a in range(0, 360, 30)]
    assert refusal_arcs(pts) == [(300.0, 60.0)]
    assert refusal_arcs([(0.0, 0.0), (90.0, 1.0), (180.0, 0.0), (270.0, 1.0)]) == [
        (90.0, 90.0),
        (270.0, 270.0),
    ]
    assert refusal_arcs([(0.0, 1.0), (180.0, 1.0)]) == [(0.0, 180.0)]
    assert refusal_arcs([(0.0, 0.0)]) == []


def test_make_report_writes_csv_markdown_plot(run_dir):
    rep = make_report(run_dir)
    assert rep.complete and rep.n_rows == len(synthetic_rows())
    with open(rep.csv_path) as f:
        rows = list(csv.DictReader(f))
    assert rows[0] == {
        "dataset": "harmful",
        "mask": "baseline",
        "angle": "",
        "n": "4",
        "refusal_rate": "1.0000",
        "mean_output_tokens": "2.0000",
        "mean_fluency": "0.5000",
        "mean_nll": "1.0000",
        "perplexity": f"{math.e:.4f}",
    }
    md = rep.markdown_path.read_text()
    assert "## plain mask" in md and "## adaptive mask" in md
    assert "| baseline | 1.00 | 0.50 | 1.00 | 2.0 | 0.00 | 1.00 | 2.00 | 5.0 |" in md
    png = rep.plot_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = rep.short_text()
    assert "harmful: refuses (≥50%) at 300°–60°" in text
    assert "harmless: refuses (≥50%) at 0°;" in text


def test_report_cli(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--out", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert "plain mask:" in out and "refusal_polar.png" in out
    assert (tmp_path / "elsewhere" / "summary.md").is_file()
    assert main([str(tmp_path / "nothing-here")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_partial_run_is_labelled(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.update(status="running", rows={"expected": 10_000})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert make_report(run_dir).short_text().startswith("(partial run")


def test_a_plane_window_sweep_is_grouped_per_setting(tmp_path):
    """Two planes x two windows: summary rows, tables and console text per (plane, window),
    one polar panel per (dataset, mode) with a trace per setting. (~2 s: one plot)"""
    rows = []
    for i in range(2):
        rows.append({**row("harmless", None, False, False, i), "plane": None, "window": None})
        for plane in ("toy", "rand"):
            for window in ("all", "2:2"):
                for a in (0.0, 180.0):
                    refused = plane == "toy" and window == "all" and a == 0.0
                    r = row("harmless", a, False, refused, i)
                    rows.append({**r, "plane": plane, "window": window})
    summary = summarize(to_table(rows))
    by = {(s.setting, s.angle): s for s in summary}
    assert len(summary) == 1 + 4 * 2
    assert by[("toy [all]", 0.0)].refusal_rate == 1.0
    assert by[("rand [all]", 0.0)].refusal_rate == 0.0 and by[("", None)].mask == "baseline"
    store, _ = RunStore.open(tmp_path / "run", "r", overwrite=False)
    store.write_manifest({"run_id": "r", "status": "complete", "rows": {"expected": len(rows)}})
    store.write_part("00000", to_table(rows))
    store.close()
    report = make_report(store.root)
    md = report.markdown_path.read_text()
    for setting in ("toy [all]", "toy [2:2]", "rand [all]", "rand [2:2]"):
        assert f"## {setting}" in md and f"== {setting} ==" in report.short_text()
    assert report.plot_path.stat().st_size > 10_000
    rows_csv = list(csv.DictReader(open(report.csv_path)))
    assert {r["setting"] for r in rows_csv} == {
        "",
        "toy [all]",
        "toy [2:2]",
        "rand [all]",
        "rand [2:2]",
    }


def test_verdict_shares_of_a_sweep_are_grouped_per_setting_too():
    """The judge's label shares follow the same (plane, window) grouping as the summary: at one
    angle, two settings whose rows got different labels stay apart."""
    import pyarrow as pa

    from rotserve.report.verdicts import label_shares
    from rotserve.rundir import row_keys

    rows = [{**row("harmless", None, False, False, 0), "plane": None, "window": None}]
    for plane in ("toy", "rand"):
        rows.append(
            {**row("harmless", 0.0, False, plane == "toy", 0), "plane": plane, "window": "all"}
        )
    table = to_table(rows)
    labels = ["direct", "refusal", "direct"]  # baseline, toy, rand
    verdicts = pa.table({"row_key": row_keys(table), "label": labels})
    shares = label_shares("j.behaviour", table, verdicts, ("direct", "refusal"))
    by = {(s.setting, s.angle, s.label): s.share for s in shares}
    assert by[("toy [all]", 0.0, "refusal")] == 1.0
    assert by[("rand [all]", 0.0, "direct")] == 1.0
    assert by[("", None, "direct")] == 1.0  # the baseline, shared by every setting
