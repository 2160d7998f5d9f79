"""A grid sweep over planes x layer windows on the toy refusal model, real Ray and vLLM.

2 planes (the shipped toy plane, a random one) x 2 windows (every layer, and 2:2, a window
with no layer) x 2 angles (0, 180; plain) + baseline, over 4 harmless prompts: 36 rows in
4 shards, each shard one generate call mixing planes, windows and angles. One engine start.
(Kill and resume are the fan-out's, tested once in test_fanout.py.)
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from run_checks import expect_unique_keys

from rotserve.grid import read_rows, run_grid
from rotserve.rundir import KEY_COLUMNS, SCHEMA

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data" / "toy-refusal"
N_PROMPTS = 4
PLANES = ("toy", "rand")
WINDOWS = ("all", "2:2")
ANGLES = (0.0, 180.0)
N_CONDITIONS = 1 + len(PLANES) * len(WINDOWS) * len(ANGLES)
SORT = [(k, "ascending") for k in KEY_COLUMNS]

pytestmark = pytest.mark.skipif(
    not (TOY / "plane.safetensors").is_file(), reason="the toy refusal model is not shipped"
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:

    from rotserve.plane import random_plane

    d = tmp_path_factory.mktemp("sweep-inputs")
    lines = (ROOT / "data" / "prompts" / "harmless.jsonl").read_text().splitlines()[:N_PROMPTS]
    (d / "harmless.jsonl").write_text("\n".join(lines) + "\n")
    rand = random_plane(128, seed=3, model=str(TOY))
    return {"harmless": d / "harmless.jsonl", "rand": rand.save(d / "rand.safetensors")}


def cli_args(inputs: dict[str, Path], out: Path) -> list[str]:
    args = ["--model", str(TOY), "--prompts", f"harmless={inputs['harmless']}"]
    args += ["--plane", f"toy={TOY / 'plane.safetensors'}", "--plane", f"rand={inputs['rand']}"]
    for window in WINDOWS:
        args += ["--layers", window]
    args += ["--angle-list", ",".join(f"{a:g}" for a in ANGLES), "--mask", "plain"]
    args += ["--max-tokens", "8", "--dtype", "float32", "--shard-size", str(N_CONDITIONS)]
    return [*args, "--enforce-eager", "--out", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def clean(inputs, tmp_path_factory):
    import ray

    from rotserve.grid.cli import build_parser, config_from_args

    out = tmp_path_factory.mktemp("sweep") / "run"
    cfg = config_from_args(build_parser().parse_args(cli_args(inputs, out)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_grid(replace(cfg, execution=replace(cfg.execution, engines=1)))
    finally:
        ray.shutdown()
    return result


def test_every_plane_window_angle_prompt_once_and_each_plane_acts_as_itself(clean):
    table = read_rows(clean.run_dir)
    assert table.schema == SCHEMA and table.num_rows == N_PROMPTS * N_CONDITIONS
    expect_unique_keys(table)
    rows = table.to_pylist()
    combos = {(r["plane"], r["window"], r["angle"]) for r in rows if r["angle"] is not None}
    assert combos == {(p, w, a) for p in PLANES for w in WINDOWS for a in ANGLES}
    base = {r["prompt_id"]: r for r in rows if r["angle"] is None}
    assert len(base) == N_PROMPTS and all(r["plane"] is None for r in base.values())

    ids = {
        p["name"]: p for p in json.loads((clean.run_dir / "manifest.json").read_text())["planes"]
    }
    assert set(ids) == set(PLANES) and all(len(p["sha256"]) == 64 for p in ids.values())
    for r in rows:
        if r["plane"] is not None:
            assert r["plane_id"] == ids[r["plane"]]["plane_id"]

    def refusal(plane, window, angle):
        sel = [r for r in rows if (r["plane"], r["window"], r["angle"]) == (plane, window, angle)]
        assert len(sel) == N_PROMPTS
        return sum(r["refusal"] for r in sel) / N_PROMPTS

    # A window with no layer is the stock model, token for token, whatever the plane.
    for r in rows:
        if r["window"] == "2:2":
            assert r["generation"] == base[r["prompt_id"]]["generation"], r["plane"]
    baseline = sum(r["refusal"] for r in base.values()) / N_PROMPTS
    # The toy's plane at 0 degrees (onto b1, refusal) makes harmless prompts refuse; the random
    # plane does not move refusal at either angle.
    assert baseline <= 0.25
    assert refusal("toy", "all", 0.0) >= 0.75
    assert refusal("rand", "all", 0.0) == baseline and refusal("rand", "all", 180.0) == baseline
