"""The analysis example reads a run's Parquet with pandas and DuckDB alone and explains it."""

import importlib.util
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rotserve.rundir import to_table

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("duckdb")
pytest.importorskip("pandas")


def load_example():
    spec = importlib.util.spec_from_file_location(
        "analyze_example", ROOT / "jobs" / "analyze_example.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(dataset, pid, angle, refusal, text):
    return {
        "run_id": "r", "model": "m", "plane_id": "p", "dataset": dataset, "prompt_id": pid,
        "instruction": f"instruction {pid}", "prompt": "<p>", "category": "", "angle": angle,
        "adaptive": False, "sample": 0, "seed": 0, "temperature": 0.0, "max_tokens": 8,
        "generation": text, "prompt_tokens": 3, "output_tokens": 4, "finish_reason": "stop",
        "refusal": refusal, "refusal_marker": "I cannot" if refusal else None, "fluency": 0.9,
    }  # fmt: skip


def test_it_reproduces_the_rates_and_picks_examples_per_region(tmp_path):
    rows = []
    for pid in ("a", "b"):
        rows.append(row("harmful", pid, None, True, "I cannot help."))
        for angle in (0.0, 90.0, 180.0, 270.0):
            refused = angle in (0.0, 270.0) or (angle == 90.0 and pid == "a")
            rows.append(
                row("harmful", pid, angle, refused, "I cannot." if refused else f"Sure {angle}")
            )
    (tmp_path / "rows").mkdir()
    pq.write_table(to_table(rows[:5]), tmp_path / "rows" / "part-00000.parquet")
    pq.write_table(to_table(rows[5:]), tmp_path / "rows" / "part-00001.parquet")

    example = load_example()
    summary = example.refusal_by_angle(tmp_path / "rows")
    rate = dict(zip(summary["angle"].fillna(-1), summary["refusal"], strict=True))
    assert rate == {-1: 1.0, 0.0: 1.0, 90.0: 0.5, 180.0: 0.0, 270.0: 1.0}
    assert example.main([str(tmp_path), "--examples", "2"]) == 0
    assert (tmp_path / "analysis" / "refusal_polar.png").stat().st_size > 10_000
    md = (tmp_path / "analysis" / "examples.md").read_text()
    assert "| away from refusal (135°-225°) | 180° | no | instruction a | Sure 180.0 |" in md
    assert md.count("toward refusal") == 2  # two examples in that region, one per prompt
    assert not math.isnan(summary["fluency"].iloc[0])
