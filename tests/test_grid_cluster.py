"""The grid on a two-node Ray cluster, started the way a user starts one.

Ray 2.60 turns token authentication on: `ray get-auth-token --generate`, RAY_AUTH_MODE=token for
every process, `ray start --head`, then `ray start --address` on the second node. Both nodes run
on 127.0.0.1 here (one CPU each, so each holds exactly one engine), and both are stopped at the
end. The grid joins with --ray-address; its table must equal a local run's, and its manifest
must say which node and host ran every engine and wrote every part.

Costs about a minute: two `ray start`s (~3 s each) and two grids of 12 rows (three engine starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_fixtures import free_port, require_vllm

from rotserve.rundir import read_rows

require_vllm()

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SORT = [(k, "ascending") for k in ("dataset", "prompt_id", "angle", "adaptive", "sample")]


def ray_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def two_nodes():
    """(address, env) of a running head + worker; stopped (both nodes) afterwards."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    token = ray_cli("get-auth-token", "--generate", env=env)
    assert token.returncode == 0, token.stderr
    address = f"127.0.0.1:{free_port()}"
    try:
        head = ray_cli(
            "start", "--head", "--port", address.split(":")[1], "--num-cpus", "1",
            "--include-dashboard", "false", env=env,
        )  # fmt: skip
        assert head.returncode == 0, head.stdout + head.stderr
        worker = ray_cli("start", "--address", address, "--num-cpus", "1", env=env)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield address, env
    finally:
        ray_cli("stop", "--force", env=env)


def grid_args(tiny_qwen2, tiny_plane, prompts: Path, out: Path) -> list[str]:
    return [
        str(ROOT / "jobs" / "grid.py"),
        "--model", str(tiny_qwen2), "--plane", str(tiny_plane),
        "--prompts", f"mixed={prompts}", "--angle-list", "0,180",
        "--max-tokens", "6", "--dtype", "float32", "--enforce-eager",
        "--shard-size", "2", "--no-progress", "--no-report", "--out", str(out),
    ]  # fmt: skip


def test_a_grid_on_two_nodes_equals_a_local_run(two_nodes, tiny_qwen2, tiny_plane, tmp_path):
    address, env = two_nodes
    prompts = tmp_path / "prompts.jsonl"
    lines = (ROOT / "data" / "prompts" / "harmful.jsonl").read_text().splitlines()[:2]
    lines += (ROOT / "data" / "prompts" / "harmless.jsonl").read_text().splitlines()[:2]
    prompts.write_text("\n".join(lines) + "\n")  # 4 prompts x 3 conditions = 12 rows, 6 shards
    args = grid_args(tiny_qwen2, tiny_plane, prompts, tmp_path / "cluster")
    joined = subprocess.run(
        [sys.executable, *args, "--ray-address", address, "--engines", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr[-3000:]
    local_args = grid_args(tiny_qwen2, tiny_plane, prompts, tmp_path / "local")
    local = subprocess.run(
        [sys.executable, *local_args, "--engines", "1"],
        cwd=ROOT, env={**env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]

    table = read_rows(tmp_path / "cluster").sort_by(SORT)
    assert table.num_rows == 12
    assert table.equals(read_rows(tmp_path / "local").sort_by(SORT))

    attempt = json.loads((tmp_path / "cluster" / "manifest.json").read_text())["attempts"][-1]
    engines = attempt["engine_info"]
    assert len({e["node"] for e in engines}) == 2, engines  # one engine on each node
    assert all(e["host"] for e in engines)
    parts = attempt["parts"]
    assert sorted(parts) == [f"{i:05d}" for i in range(6)]
    assert {p["node"] for p in parts.values()} == {e["node"] for e in engines}
