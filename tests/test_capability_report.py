"""The report's capability side: the range math (pure), and a report on a hand-made run
directory with a capability table (no engine: rows and scores written as the schemas say)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rotserve.capability.table import SCORE_SCHEMA, SCORES_FILE, TABLE_MANIFEST, table_dir
from rotserve.grid.store import RunStore
from rotserve.report import make_report
from rotserve.report.capability import (
    Arc,
    CleanMargins,
    arcs_of,
    below_range,
    format_arcs,
    margin_range,
    primary_metric,
    within_margin,
)
from rotserve.report.cli import main
from rotserve.rundir import to_table
from tests.test_report import row

ANGLES = [float(a) for a in range(0, 360, 30)]

# ----------------------------------------------------------------------------- range math


def test_arcs_join_through_zero():
    keep = [a >= 300 or a <= 60 for a in ANGLES]
    assert arcs_of(ANGLES, keep) == [Arc(300, 60)]
    assert format_arcs(arcs_of(ANGLES, keep)) == "300°–60°"


def test_arcs_in_any_order_and_single_angles():
    angles = [90.0, 0.0, 180.0, 270.0, 45.0]
    keep = [True, False, False, True, True]  # 45, 90 and 270 (alone: 0 and 180 are dropped)
    assert arcs_of(angles, keep) == [Arc(45, 90), Arc(270, 270)]
    assert format_arcs(arcs_of(angles, keep)) == "45°–90°, 270°"


def test_no_angle_kept_and_no_angles_are_empty():
    assert arcs_of(ANGLES, [False] * len(ANGLES)) == []
    assert arcs_of([], []) == []
    assert format_arcs([]) == "none"


def test_every_angle_kept_is_the_full_circle():
    arcs = arcs_of(ANGLES, [True] * len(ANGLES))
    assert arcs == [Arc(0, 330, full=True)]
    assert format_arcs(arcs) == "all angles (0°–330°)"


def test_arcs_need_one_flag_per_angle():
    with pytest.raises(ValueError, match="12 angles but 2 flags"):
        arcs_of(ANGLES, [True, False])


def test_within_margin_is_one_sided_and_inclusive():
    # higher is better: a drop up to the margin is within, any rise is
    assert within_margin([0.85, 0.849, 1.0], baseline=0.9, margin=0.05) == [True, False, True]
    # lower is better (an NLL): a rise up to the margin is within, any fall is
    nll = within_margin([1.5, 1.51, 0.2], baseline=1.0, margin=0.5, higher_is_better=False)
    assert nll == [True, False, True]


def test_an_unmeasured_angle_is_never_within():
    assert within_margin([None, math.nan, 0.9], baseline=0.9, margin=0.1) == [False, False, True]


def test_a_negative_margin_is_refused():
    with pytest.raises(ValueError, match="margin must be >= 0"):
        within_margin([1.0], baseline=1.0, margin=-0.1)


def test_margin_range_and_below_range():
    scores = [0.9 if a not in (90.0, 120.0) else 0.5 for a in ANGLES]
    assert margin_range(ANGLES, scores, 0.9, 0.05) == [Arc(150, 60)]
    assert margin_range(ANGLES, scores, 0.9, 0.5) == [Arc(0, 330, full=True)]
    rates = [1.0 if a <= 60 or a >= 300 else 0.1 for a in ANGLES]
    assert below_range(ANGLES, rates, 0.5) == [Arc(90, 270)]


def test_primary_metric_follows_the_task_config_else_the_unfiltered_metric():
    scores = [{"metric": m, "filter": f} for m in ("acc", "acc_norm") for f in ("none", "x")]
    config = {"metric_list": [{"metric": "acc_norm"}], "filter_list": [{"name": "x"}]}
    assert primary_metric(scores, config) == ("acc_norm", "x")
    assert primary_metric(scores, None) == ("acc", "none")


# ----------------------------------------------------------------------------- the report


def _nll(angle: float | None) -> float:
    """Coherent (1.2) except at 150°-210°, where it is broken (3.0); the baseline 1.0."""
    if angle is None:
        return 1.0
    return 3.0 if 150 <= angle <= 210 else 1.2


def _acc(angle: float | None) -> float:
    """Baseline 0.9; 0.5 at 90° and 120°; better than baseline (0.95) elsewhere."""
    if angle is None:
        return 0.9
    return 0.5 if angle in (90.0, 120.0) else 0.95


def _score(task: str, metric: str, value: float, angle: float | None, group: bool = False):
    return {
        "capability_id": "c",
        "run_id": "r",
        "model": "/models/toy",
        "task": task,
        "is_group": group,
        "metric": metric,
        "filter": "none",
        "value": value,
        "stderr": None,
        "higher_is_better": True,
        "n_samples": 24,
        "angle": angle,
        "adaptive": False,
        "plane": None if angle is None else "default",
        "window": None if angle is None else "all",
    }


@pytest.fixture()
def cap_run(tmp_path) -> Path:
    """harmful refuses at 300°-60° (and unsteered), coherence breaks at 150°-210°, the task's
    acc at 90°-120°; the task's acc_norm (not its primary metric) breaks everywhere."""
    rows = []
    for i in range(2):
        for a in [None, *ANGLES]:
            refused = a is None or a <= 60 or a >= 300
            for ds, r in (("harmful", refused), ("harmless", False)):
                rows.append({**row(ds, a, False, r, i), "nll": _nll(a)})
    store, _ = RunStore.open(tmp_path / "run", "r", overwrite=False)
    store.write_manifest({"run_id": "r", "status": "complete", "rows": {"expected": len(rows)}})
    store.write_part("00000", to_table(rows))
    store.close()
    scores = []
    for a in [None, *ANGLES]:
        scores.append(_score("toy_reply_mc", "acc", _acc(a), a))
        scores.append(_score("toy_reply_mc", "acc_norm", 0.0 if a is not None else 0.9, a))
        scores.append(_score("toy_group", "acc", 0.0 if a is not None else 0.9, a, group=True))
    d = table_dir(store.root, "toy_reply_mc")
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(scores, schema=SCORE_SCHEMA), d / SCORES_FILE)
    config = {"metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    manifest = {"status": "complete", "tasks": {"configs": {"toy_reply_mc": config}}}
    (d / TABLE_MANIFEST).write_text(json.dumps(manifest))
    return store.root


def test_report_draws_a_circle_per_task_and_states_the_ranges(cap_run):
    """Refusal range 90°-270°; clean where coherence and acc both hold (240°-60°, through 0°);
    overlap 240°-270°. The group is drawn but does not judge cleanness. (~3 s: three plots)"""
    rep = make_report(cap_run)
    assert rep.capability is not None
    names = sorted(p.name for p in rep.capability.circles)
    assert names == ["capability_toy_group_polar.png", "capability_toy_reply_mc_polar.png"]
    assert all(p.stat().st_size > 10_000 for p in rep.capability.circles)
    [ranges] = rep.capability.ranges
    assert (ranges.setting, ranges.mask) == ("", "plain")
    assert ranges.refusal == [Arc(90, 270)]
    assert ranges.clean == [Arc(240, 60)]
    assert ranges.overlap == [Arc(240, 270)]
    md = rep.markdown_path.read_text()
    assert "| default | plain | 90°–270° | 240°–60° | 240°–270° |" in md
    assert "toy_reply_mc (acc)" in md and "toy_group" not in md.split("## Refusal range")[1]
    assert "overlap 240°–270°" in rep.short_text()


def test_report_cli_margins_move_the_clean_range(cap_run, tmp_path, capsys):
    """A score margin of 0.5 forgives the acc drop: clean is all but 150°-210°."""
    out = tmp_path / "rep"
    assert main([str(cap_run), "--out", str(out), "--clean-score-margin", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "clean 240°–120°; overlap 90°–120°, 240°–270°" in text
    assert f"capability {out / 'capability_toy_reply_mc_polar.png'}" in text
    # a looser NLL margin too: nothing breaks, every angle is clean
    assert main([str(cap_run), "--out", str(out), "--clean-score-margin", "0.5",
                 "--clean-nll-margin", "2.0", "--quiet"]) == 0  # fmt: skip
    assert "| all angles (0°–330°) | 90°–270° |" in (out / "summary.md").read_text()


def test_report_cli_refuses_a_negative_margin_and_an_unknown_dataset(cap_run, capsys):
    assert main([str(cap_run), "--clean-nll-margin", "-1"]) == 2
    assert "--clean-nll-margin must be >= 0" in capsys.readouterr().err
    assert main([str(cap_run), "--refusal-dataset", "nope"]) == 2
    assert "--refusal-dataset 'nope' is not in the run" in capsys.readouterr().err


def test_margins_default_to_the_documented_values():
    m = CleanMargins()
    assert (m.nll_margin, m.score_margin, m.refusal_threshold) == (0.5, 0.05, 0.5)
