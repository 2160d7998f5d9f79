"""The fan-out's guarantees, tested once, with a trivial worker on a real local Ray cluster.

Every job (the grid, the judge) runs on rotserve.fanout, so these hold for each of them:
- a run publishes every shard exactly once, as one complete part;
- an engine whose process dies with shards in flight is replaced, its shards re-queued, and
  nothing is lost or doubled;
- an engine that cannot start fails the run at once, with its own error;
- a shard that keeps raising stops the run after two tries, keeping the finished parts, and a
  rerun resumes from them;
- a job SIGKILLed mid-run (driver, Ray and engines) leaves only complete parts, and rerunning it
  resumes to the same table.
The worker (tests/count_job.py) needs no model, so each case costs a Ray actor start, not a
vLLM engine start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from count_job import CountSpec, count_plan, run_count_job
from run_checks import run_killed_job

from rotserve.fanout import ExecutionOptions, FanOutError

TESTS = Path(__file__).resolve().parent
N_SHARDS = 8
ONE_ENGINE = ExecutionOptions(engines=1, progress=False)
TWO_ENGINES = ExecutionOptions(engines=2, progress=False)


@pytest.fixture(scope="module", autouse=True)
def cluster(ray_cluster):
    import count_job

    ray_cluster.cloudpickle.register_pickle_by_value(count_job)
    return ray_cluster


def table_of(root: Path):
    return pq.read_table(root / "parts").sort_by([("shard", "ascending"), ("row", "ascending")])


def expected_values(n_shards: int = N_SHARDS, rows: int = 3) -> list[int]:
    return [s * 1000 + r for s in range(n_shards) for r in range(rows)]


def test_every_shard_is_published_once(tmp_path):
    attempt = run_count_job(tmp_path / "run", count_plan(N_SHARDS), CountSpec(), TWO_ENGINES)
    assert attempt.state == "new" and attempt.stats.shards_written == N_SHARDS
    assert table_of(tmp_path / "run").column("value").to_pylist() == expected_values()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"]["written"] == 3 * N_SHARDS
    assert sorted(manifest["attempts"][-1]["parts"]) == [f"{i:05d}" for i in range(N_SHARDS)]

    again = run_count_job(tmp_path / "run", count_plan(N_SHARDS), CountSpec(), TWO_ENGINES)
    assert again.state == "resume" and again.skipped == N_SHARDS
    assert again.stats.shards_written == 0 and again.stats.engines == 0  # no engine started


def test_an_engine_that_dies_mid_run_loses_and_doubles_nothing(tmp_path):
    spec = CountSpec(die_at=2, marker=str(tmp_path / "died"), seconds_per_shard=0.2)
    attempt = run_count_job(tmp_path / "run", count_plan(N_SHARDS), spec, TWO_ENGINES)
    assert (tmp_path / "died").exists(), "no engine died: the test exercised nothing"
    assert attempt.stats.engine_failures == 1
    assert attempt.stats.requeued, "the dead engine's shards were not re-queued"
    assert table_of(tmp_path / "run").column("value").to_pylist() == expected_values()


def test_an_engine_that_cannot_start_fails_fast_with_its_error(tmp_path):
    starts = tmp_path / "starts"
    spec = CountSpec(fail_init=True, starts=str(starts))
    with pytest.raises(FanOutError, match="failed to start.*config.json is broken"):
        run_count_job(tmp_path / "run", count_plan(N_SHARDS), spec, ONE_ENGINE)
    # Fails at the first start: an engine that never came up is not retried.
    assert len(starts.read_text().splitlines()) == 1
    assert list((tmp_path / "run" / "parts").iterdir()) == []
    attempt = json.loads((tmp_path / "run" / "manifest.json").read_text())["attempts"][-1]
    assert "config.json is broken" in attempt["error"]


def test_a_shard_that_keeps_failing_stops_the_run_and_a_rerun_resumes(tmp_path):
    poisoned = CountSpec(poison="00005")
    with pytest.raises(FanOutError, match="shard 00005 failed 2 times.*cannot tokenize"):
        run_count_job(tmp_path / "run", count_plan(N_SHARDS), poisoned, ONE_ENGINE)
    parts = sorted((tmp_path / "run" / "parts").glob("part-*.parquet"))
    assert 0 < len(parts) < N_SHARDS  # the shards before the poisoned one are on disk
    done = run_count_job(tmp_path / "run", count_plan(N_SHARDS), CountSpec(), ONE_ENGINE)
    assert done.skipped == len(parts) and done.rows_total == 3 * N_SHARDS
    assert table_of(tmp_path / "run").column("value").to_pylist() == expected_values()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [a["state"] for a in manifest["attempts"]] == ["new", "resume"]
    assert "cannot tokenize" in manifest["attempts"][0]["error"]


KILL_AFTER_PARTS = 3


def test_a_killed_job_resumes_to_the_same_table(tmp_path):
    out = tmp_path / "killed"
    args = [str(out), str(N_SHARDS), "0.1"]
    run_killed_job("count_job:CountStore", "count_job", args, KILL_AFTER_PARTS, TESTS, 300)
    parts = sorted((out / "parts").iterdir())
    assert len(parts) == KILL_AFTER_PARTS
    for p in parts:  # what a killed job leaves is only complete part files
        assert p.name.startswith("part-") and pq.read_metadata(p).num_rows == 3
    assert json.loads((out / "manifest.json").read_text()).get("status") is None  # unfinished

    rerun = subprocess.run(
        [sys.executable, "count_job.py", *args],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{KILL_AFTER_PARTS} of {N_SHARDS} shards already on disk" in rerun.stderr
    assert table_of(out).column("value").to_pylist() == expected_values()
