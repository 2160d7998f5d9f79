"""Run directory: schema, atomic parts, resume bookkeeping, and the readers users will use."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_checks import expect_unique_keys

from rotserve.engine import Completion
from rotserve.grid.config import PromptSet
from rotserve.grid.plan import conditions, make_plan
from rotserve.grid.rows import GridRunError, RowContext, shard_rows
from rotserve.grid.store import RunStore
from rotserve.prompts import Prompt
from rotserve.rundir import SCHEMA, RunDirError, read_rows, to_table

CTX = RowContext(
    run_id="r1", model="/m", plane_id="p1", max_tokens=8, temperature=0.0, seed=0, samples=2
)


def small_plan(shard_size: int = 4):
    prompts = tuple(Prompt(id=f"h{i}", instruction=f"do {i}", category="c") for i in range(3))
    sets = (PromptSet("harmful", Path("/h.jsonl"), "0", prompts),)
    return make_plan(sets, conditions([0.0, 180.0], (False, True), True), shard_size, samples=2)


def fake_records(units, n=2):
    out = []
    for u in units:
        for k in range(n):
            refuse = u.condition.angle == 0.0
            out.append(
                Completion(
                    instruction=u.instruction,
                    prompt=f"<u>{u.instruction}</u>",
                    angle=u.condition.angle,
                    adaptive=u.condition.adaptive,
                    mode="absolute",
                    sample=k,
                    generation="I'm sorry, I can't." if refuse else f"Sure: step {k}.",
                    token_ids=(7, 8, 9, 2),
                    prompt_tokens=5,
                    finish_reason="stop",
                )
            )
    return out


def write_all(store: RunStore, plan) -> None:
    for shard in plan.shards:
        store.write_part(
            shard.shard_id, to_table(shard_rows(shard.units, fake_records(shard.units), CTX))
        )


def test_rows_have_the_schema_and_scores():
    plan = small_plan()
    shard = plan.shards[0]
    table = to_table(shard_rows(shard.units, fake_records(shard.units), CTX))
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    base = rows[0]
    assert base["angle"] is None and base["adaptive"] is False and base["sample"] == 0
    assert rows[1]["sample"] == 1
    refused = [r for r in rows if r["angle"] == 0.0]
    assert refused and all(r["refusal"] and r["refusal_marker"] == "I'm sorry" for r in refused)
    assert all(r["refusal_marker"] is None for r in rows if not r["refusal"])
    assert all(0.0 <= r["fluency"] <= 1.0 for r in rows)


@pytest.mark.parametrize(
    "wrong",
    [
        {"instruction": "another prompt"},
        {"angle": 123.0},
        {"adaptive": True},
        {"sample": 1},
    ],
    ids=lambda w: next(iter(w)),
)
def test_a_completion_paired_with_the_wrong_unit_fails_loudly(wrong):
    """Every field that identifies a row is checked: a reordering never mislabels rows."""
    shard = small_plan().shards[0]
    recs = fake_records(shard.units)
    assert not recs[0].adaptive and recs[0].sample == 0  # so each change below is a change
    recs[0] = dataclasses.replace(recs[0], **wrong)
    with pytest.raises(GridRunError, match="expected"):
        shard_rows(shard.units, recs, CTX)


def test_a_missing_completion_fails_loudly():
    shard = small_plan().shards[0]
    with pytest.raises(GridRunError, match="completions for"):
        shard_rows(shard.units, fake_records(shard.units)[:-1], CTX)


def test_parts_are_atomic_and_resume_sees_them(tmp_path):
    plan = small_plan()
    store, state = RunStore.open(tmp_path / "run", "r1", overwrite=False)
    assert state == "new"
    assert store.finished_shards(plan) == set()
    write_all(store, plan)
    assert store.finished_shards(plan) == {s.shard_id for s in plan.shards}
    assert list(store.tmp_dir.glob("*.tmp")) == []
    table = read_rows(store.root)
    assert table.num_rows == plan.n_rows
    expect_unique_keys(table)
    # a damaged part (wrong row count) is not trusted: deleted and its shard redone
    first = store.rows_dir / "part-00000.parquet"
    pq.write_table(to_table([]), first)
    assert "00000" not in store.finished_shards(plan) and not first.exists()
    # a foreign file in rows/ would be read as data: refused
    (store.rows_dir / "stray.parquet").write_bytes(b"x")
    with pytest.raises(RunDirError, match="not a part file"):
        store.finished_shards(plan)
    store.close()


def test_a_crash_while_writing_leaves_no_part(tmp_path, monkeypatch):
    plan = small_plan()
    store, _ = RunStore.open(tmp_path / "run", "r1", overwrite=False)
    shard = plan.shards[0]
    table = to_table(shard_rows(shard.units, fake_records(shard.units), CTX))

    def dies_halfway(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise KeyboardInterrupt  # as if the job were killed mid-write

    monkeypatch.setattr(pq, "write_table", dies_halfway)
    with pytest.raises(KeyboardInterrupt, match="^$"):
        store.write_part(shard.shard_id, table)
    assert list(store.rows_dir.iterdir()) == []  # readers see nothing
    assert len(list(store.tmp_dir.glob("*.tmp"))) == 1  # the orphan is in _tmp/
    store.close()
    store, state = RunStore.open(store.root, "r1", overwrite=False)  # the next start cleans it
    assert list(store.tmp_dir.glob("*.tmp")) == []
    store.close()


def test_one_writer_at_a_time(tmp_path):
    store, _ = RunStore.open(tmp_path / "run", "r1", overwrite=False)
    with pytest.raises(RunDirError, match="another grid job"):
        RunStore.open(tmp_path / "run", "r1", overwrite=False)
    store.close()
    RunStore.open(tmp_path / "run", "r1", overwrite=False)[0].close()


def test_overwrite_removes_only_run_files(tmp_path):
    root = tmp_path / "run"
    store, _ = RunStore.open(root, "old", overwrite=False)
    store.write_manifest({"run_id": "old"})
    write_all(store, small_plan())
    store.close()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds a different run .* --overwrite"):
        RunStore.open(root, "new", overwrite=False)
    store, state = RunStore.open(root, "new", overwrite=True)
    assert state == "overwrite"
    assert list(store.rows_dir.iterdir()) == [] and not (root / "manifest.json").exists()
    assert (root / "notes.txt").read_text() == "mine"
    store.close()


def test_pandas_polars_duckdb_read_the_rows_directory(tmp_path):
    plan = small_plan()
    store, _ = RunStore.open(tmp_path / "run", "r1", overwrite=False)
    store.write_manifest({"run_id": "r1"})
    write_all(store, plan)
    (store.tmp_dir / "part-99999.parquet.dead.tmp").write_bytes(b"half")  # must be invisible
    rows = str(store.rows_dir)
    n = plan.n_rows

    pdf = pd.read_parquet(rows)
    assert len(pdf) == n and pdf["angle"].isna().sum() == 3 * 2
    assert str(pdf["sample"].dtype) == "int32" and str(pdf["refusal"].dtype) == "bool"

    pldf = pl.read_parquet(rows)
    assert pldf.height == n and pldf.schema["angle"] == pl.Float64
    assert pl.scan_parquet(f"{rows}/*.parquet").select(pl.len()).collect().item() == n

    con = duckdb.connect()
    assert con.sql(f"select count(*) from read_parquet('{rows}/*.parquet')").fetchall()[0][0] == n
    rate = con.sql(
        f"select avg(refusal::int) from read_parquet('{rows}/*.parquet') where angle = 0"
    ).fetchall()[0][0]
    assert rate == 1.0
    assert pa.types.is_float64(read_rows(store.root).schema.field("angle").type)
    store.close()
