"""Smoke test of the benchmark machinery on a 2-layer model: structure only, no timing claims.

Speed is measured by `python jobs/bench.py`, side by side in one run; a unit test on a shared
machine can only check that every benchmark runs and produces well-formed, positive numbers.
"""

from __future__ import annotations

import json
import math

import pytest

from rotserve.bench.report import BEGIN, END
from rotserve.bench.runner import TOP_LEVEL, BenchSettings, run_bench
from rotserve.bench.timing import alternate


def test_alternate_reverses_order_and_pairs_rounds() -> None:
    calls: list[str] = []

    def contender(name: str):
        def run() -> float:
            calls.append(name)
            return 10.0

        return run

    rounds = alternate({"a": contender("a"), "b": contender("b")}, rounds=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert len(rounds.paired_ratios("a", "b")) == 2
    assert all(r > 0 for r in rounds.rates("a"))


@pytest.mark.timeout(300)
def test_bench_tiny_run_writes_well_formed_results(tmp_path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# old\n\n{BEGIN}\nkeep this analysis\n{END}\n")
    doc = run_bench(BenchSettings.tiny(), tmp_path / "out", markdown, tmp_path / "models")

    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["steer_overhead_ratio"] == doc["steer_overhead_ratio"]
    for key in TOP_LEVEL:
        assert key in saved, key
    for key in TOP_LEVEL[:-1]:
        value = saved[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert saved["device"].startswith("cpu")
    for key in ("machine", "versions", "settings", "models", "details", "targets", "load"):
        assert key in saved
    assert set(saved["targets"]) == {
        "steer_overhead_ratio",
        "grid_speedup",
        "distinct_angles_ratio",
        "rotation_vs_copy",
    }
    d = saved["details"]
    for section, pair in (
        ("steer_overhead", ("rotserve", "stock")),
        ("distinct_angles", ("distinct", "shared")),
        ("grid", ("rotserve", "hf")),
    ):
        for name in pair:
            assert d[section][name]["median_rate"] > 0
            assert d[section][name]["work_per_run"] > 0
        assert all(r > 0 for r in d[section]["paired_ratios"])
    # Equal work on both sides of each comparison.
    assert (
        d["steer_overhead"]["rotserve"]["work_per_run"]
        == d["steer_overhead"]["stock"]["work_per_run"]
    )
    assert d["grid"]["rotserve"]["work_per_run"] == d["grid"]["tokens_per_grid"]
    assert d["grid"]["hf"]["work_per_run"] == d["grid"]["tokens_per_grid"]
    assert d["extract"]["peak_rss_bytes"] > d["extract"]["rss_start_bytes"] > 0
    # The roofline: both contenders' achieved rates against the machine's matmul peak.
    roof = d["grid"]["roofline"]
    assert d["grid"]["matmul_peak"]["peak_tflops"] > 0
    assert roof["tokens_processed_per_grid"] > d["grid"]["tokens_per_grid"]  # prompts count too
    assert roof["achieved_tflops"]["rotserve"] > 0 and roof["achieved_tflops"]["hf"] > 0
    assert roof["speedup_ceiling"] == pytest.approx(
        d["grid"]["matmul_peak"]["peak_tflops"] / roof["achieved_tflops"]["hf"]
    )

    text = markdown.read_text()
    assert "keep this analysis" in text and "| `grid_speedup` |" in text
    assert "Roofline:" in text
    assert (tmp_path / "out" / "bench.md").is_file()
