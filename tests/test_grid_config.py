"""Grid configuration and CLI validation: every bad input is refused before Ray or vLLM start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rotserve.fanout import ExecutionOptions
from rotserve.grid import GridConfig, GridConfigError
from rotserve.grid.cli import build_parser, config_from_args
from rotserve.grid.config import (
    evenly_spaced,
    normalize_angles,
    parse_angle_count,
    parse_angle_list,
    parse_prompt_set,
    resolve,
)
from rotserve.grid.store import RunStore
from rotserve.pipeline import main
from rotserve.rundir import MANIFEST, RunDirError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if anything tries to start Ray or an engine."""
    import ray

    def boom(*a, **k):
        raise AssertionError("Ray was started although the input is invalid")

    monkeypatch.setattr(ray, "init", boom)
    monkeypatch.setattr("rotserve.grid.rows.make_engine", boom)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_qwen2, tiny_plane) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("grid-inputs")
    good = d / "good.jsonl"
    good.write_text('{"id": "a", "instruction": "Say hi"}\n{"id": "b", "instruction": "Say bye"}\n')
    bad = d / "bad.jsonl"
    bad.write_text('{"id": "a", "instruction": "ok"}\n{"id": "b", "instruction": \n')
    dupes = d / "dupes.jsonl"
    dupes.write_text('{"id": "a", "instruction": "x"}\n{"id": "a", "instruction": "y"}\n')
    from rotserve.plane import Plane, orthonormal_plane

    g = torch.Generator().manual_seed(3)
    b1, b2 = orthonormal_plane(torch.randn(64, generator=g), torch.randn(64, generator=g))
    wrong = Plane(b1, b2).save(d / "plane64.safetensors")
    return {
        "model": tiny_qwen2,
        "plane": tiny_plane,
        "good": good,
        "bad": bad,
        "dupes": dupes,
        "wrong_plane": wrong,
        "dir": d,
    }


def base_args(inputs: dict[str, Path], out: Path) -> list[str]:
    return [
        "--model",
        str(inputs["model"]),
        "--plane",
        str(inputs["plane"]),
        "--prompts",
        f"p={inputs['good']}",
        "--angles",
        "4",
        "--out",
        str(out),
        "--no-progress",
    ]


# --- angles ----------------------------------------------------------------------------------


def test_evenly_spaced_angles():
    assert evenly_spaced(4) == (0.0, 90.0, 180.0, 270.0)
    a72 = evenly_spaced(72)
    assert len(a72) == 72 and a72[1] == 5.0 and a72[-1] == 355.0


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "abc", ""])
def test_bad_angle_counts(text):
    with pytest.raises(GridConfigError, match="--angles takes a whole number|at least 1"):
        parse_angle_count(text)


def test_angle_list_parsing():
    assert parse_angle_list("0, 90,180.5") == (0.0, 90.0, 180.5)
    assert parse_angle_list("-90,370") == (270.0, 10.0)  # folded into [0, 360)
    for bad in ("0,360", "0,,90", "x", "", "nan"):
        with pytest.raises(GridConfigError, match="--angle-list|angle .* twice|not a finite"):
            parse_angle_list(bad)
    with pytest.raises(GridConfigError, match="the angle list is empty"):
        normalize_angles([])


def test_prompt_set_parsing():
    assert parse_prompt_set("harm=data/x.jsonl") == ("harm", "data/x.jsonl")
    assert parse_prompt_set("data/foo.csv") == ("foo", "data/foo.csv")
    with pytest.raises(GridConfigError, match="--prompts takes label=FILE"):
        parse_prompt_set("=x.jsonl")


# --- CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--angles", "0"], "at least 1"),
        (["--angles", "-4"], "at least 1"),
        (["--angles", "3.5"], "whole number"),
        (["--angle-list", "0,90,90"], "twice"),
        (["--max-tokens", "0"], "at least 1"),
        (["--angles", "4", "--angle-list", "0,90"], "not allowed with"),
        (["--mask", "sideways"], "invalid choice"),
        (["--engines", "0"], "--engines must be at least 1"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys, no_ray):
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        main(argv)
    assert message in capsys.readouterr().err


def test_cli_help_states_defaults(capsys):
    with pytest.raises(SystemExit, match="^0$"):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "--angles N",
        "default: 36",
        "--max-tokens",
        "(default: 32)",
        "--mask {plain,adaptive,both}, --mode {plain,adaptive,both}",
        "Plain by default",
        "--ray-address",
        "--engines",
        "--overwrite",
        "--no-baseline",
        "harmful=",
    ):
        assert expected in text, expected


def test_cli_defaults_build_the_embedded_config():
    cfg = config_from_args(build_parser().parse_args(["--angles", "72"]))
    assert len(cfg.angles) == 72 and cfg.baseline and cfg.mask == "plain"
    assert cfg.model.endswith("toy-refusal") and cfg.plane is None
    assert [label for label, _ in cfg.prompts] == ["harmful", "harmless"]
    assert config_from_args(build_parser().parse_args(["--mask", "adaptive"])).mask == "adaptive"
    # --mode: the flag's earlier name, as older command lines (and scripts) spell it
    assert config_from_args(build_parser().parse_args(["--mode", "both"])).mask == "both"


@pytest.mark.parametrize(
    "key, extra, message",
    [
        ("missing prompts", ["--prompts", "x=/nonexistent/prompts.jsonl"], "prompt file not found"),
        ("malformed prompts", ["--prompts", "BAD"], "bad.jsonl:2: not valid JSON"),
        ("duplicate ids", ["--prompts", "DUPES"], "prompt id(s) used twice"),
        ("wrong plane", ["--plane", "WRONG_PLANE"], "plane has hidden size 64 but"),
        ("missing plane", ["--plane", "/nonexistent/plane.safetensors"], "file not found"),
        ("missing model", ["--model", "/nonexistent/model"], "no such directory"),
    ],
)
def test_cli_rejects_bad_inputs_before_ray(key, extra, message, inputs, tmp_path, capsys, no_ray):
    subst = {"BAD": f"bad={inputs['bad']}", "DUPES": f"d={inputs['dupes']}"}
    subst["WRONG_PLANE"] = str(inputs["wrong_plane"])
    argv = base_args(inputs, tmp_path / "out") + [subst.get(x, x) for x in extra]
    assert main(argv) == 2, key
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()  # nothing written either


def test_plane_hidden_size_checked_against_model_config(inputs):
    cfg = GridConfig(
        model=str(inputs["model"]),
        plane=str(inputs["wrong_plane"]),
        prompts=(("p", str(inputs["good"])),),
    )
    with pytest.raises(GridConfigError, match="hidden size 64 but .* has 128"):
        resolve(cfg)


def test_out_with_another_runs_manifest_is_refused(inputs, tmp_path, capsys, no_ray):
    out = tmp_path / "taken"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"run_id": "someoneelse", "created": "yesterday"}))
    assert main(base_args(inputs, out)) == 2
    err = capsys.readouterr().err
    assert "holds a different run" in err and "--overwrite" in err
    assert json.loads((out / MANIFEST).read_text())["run_id"] == "someoneelse"  # untouched


def test_out_that_is_not_a_run_is_refused(inputs, tmp_path, capsys, no_ray):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(base_args(inputs, out)) == 2
    assert "not a rotserve run" in capsys.readouterr().err


def test_run_dir_states(tmp_path):
    root = tmp_path / "r"
    assert RunStore.check(root, "abc", overwrite=False) == "new"
    root.mkdir()
    (root / MANIFEST).write_text(json.dumps({"run_id": "abc"}))
    assert RunStore.check(root, "abc", overwrite=False) == "resume"
    with pytest.raises(RunDirError, match=r"holds a different run \(run id abc"):
        RunStore.check(root, "other", overwrite=False)
    assert RunStore.check(root, "other", overwrite=True) == "overwrite"


def test_run_id_is_stable_and_tracks_what_changes_rows(inputs):
    common = dict(
        model=str(inputs["model"]),
        plane=str(inputs["plane"]),
        prompts=(("p", str(inputs["good"])),),
    )
    a = resolve(GridConfig(**common, angles=evenly_spaced(4)))
    where = ExecutionOptions(engines=7, ray_address="auto")
    b = resolve(GridConfig(**common, angles=evenly_spaced(4), execution=where))
    c = resolve(GridConfig(**common, angles=evenly_spaced(4), max_tokens=99))
    assert a.run_id == b.run_id  # execution settings do not change the rows
    assert a.run_id != c.run_id
    assert a.out.name == f"grid-{a.run_id}" and a.out.is_absolute()
    assert a.model == str(Path(inputs["model"]).resolve())


def test_jobs_script_fails_fast_without_ray():
    """The real entry point, in a fresh interpreter: a bad count exits 2 without importing Ray."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['jobs/grid.py', '--angles', '0']\n"
        "try:\n"
        "    runpy.run_path('jobs/grid.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'ray' in sys.modules, 'vllm' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "exit 2 False False" in out.stdout, out.stdout + out.stderr
    assert "--angles" in out.stderr and "at least 1" in out.stderr


def test_plane_inside_model_dir_without_index_is_refused(inputs, tmp_path):
    """vLLM would read the plane as weights; say so before any engine starts."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(inputs["model"], model)
    (model / "model.safetensors.index.json").unlink(missing_ok=True)
    shutil.copy(inputs["plane"], model / "plane.safetensors")
    cfg = GridConfig(model=str(model), prompts=(("p", str(inputs["good"])),))
    with pytest.raises(GridConfigError, match="vLLM would load it as model weights"):
        resolve(cfg)
    (model / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert resolve(cfg).plane_path == model / "plane.safetensors"  # the shipped-plane default


def test_plane_and_window_sweeps_resolve_before_ray(inputs, tmp_path, no_ray):
    """--plane NAME=FILE x --layers WINDOW (incl. selective) resolve, or fail naming the flag
    and the fix, without Ray or vLLM. (<1 s)"""
    from rotserve.grid.config import resolve
    from rotserve.grid.job import plan_grid
    from rotserve.plane import Plane, PlaneMeta, load_plane

    base = load_plane(inputs["plane"])
    # A plane with extraction statistics: layer 1 separates by sign on b1, layer 0 does not.
    stats = [
        {"kind": "resid_mid", "layer": 0, "harmful_b1": 0.3, "harmless_b1": 0.1},
        {"kind": "resid_mid", "layer": 1, "harmful_b1": 0.3, "harmless_b1": -0.2},
        {"kind": "resid_post", "layer": 0, "harmful_b1": 0.3, "harmless_b1": -0.2},
    ]
    with_stats = Plane(base.b1, base.b2, PlaneMeta(candidates=stats)).save(
        tmp_path / "stats.safetensors"
    )
    args = base_args(inputs, tmp_path / "out")
    i = args.index("--plane")
    args[i : i + 2] = ["--plane", f"a={with_stats}", "--plane", f"b={inputs['plane']}"]
    cfg = config_from_args(build_parser().parse_args([*args, "--layers", "all", "--layers", "1:"]))
    resolved = resolve(cfg)
    assert resolved.plane_names == ("a", "b") and resolved.windows == ("all", "1:")
    plan = plan_grid(resolved)
    steered = [c for c in plan.conditions if c.angle is not None]
    assert {(c.plane, c.window) for c in steered} == {
        (p, w) for p in ("a", "b") for w in ("all", "1:")
    }
    single = resolve(config_from_args(build_parser().parse_args(base_args(inputs, tmp_path / "o"))))
    assert resolved.run_id != single.run_id and "planes" not in single.identity()

    selective = GridConfig(
        **{**cfg.__dict__, "planes": (("a", str(with_stats)),), "windows": ("selective",)}
    )
    assert resolve(selective).selective == (("a", "1"),)
    no_stats = GridConfig(**{**selective.__dict__, "planes": (("b", str(inputs["plane"])),)})
    with pytest.raises(
        GridConfigError, match="selective: plane 'b' has no per-layer .* re-extract"
    ):
        resolve(no_stats)
    for window, needle in (("5", "out of range"), ("1:2:3", "layer window"), ("all", "twice")):
        bad = GridConfig(
            **{**cfg.__dict__, "windows": ("all", window) if window == "all" else (window,)}
        )
        with pytest.raises(GridConfigError, match=needle):
            resolve(bad)
