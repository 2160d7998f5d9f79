"""`rotserve graphcheck`: the rotation table stays a live input under torch.compile (and, on a
GPU, CUDA-graph replay), checked with plain torch. No GPU here: the CUDA-graph check is
skipped and says so; the compile check runs with inductor on CPU."""

from __future__ import annotations

import json

import torch

from rotserve.graphcheck import main

SMALL = ["--device", "cpu", "--hidden", "64", "--layers", "2", "--tokens", "32", "--requests", "4"]


def test_compiled_code_follows_the_table_refilled_in_place(tmp_path, capsys):
    report = tmp_path / "graphcheck.json"
    assert main([*SMALL, "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["ok"] is True
    names = [c["name"] for c in got["checks"]]
    assert names == ["steering changes the output", "compiled code reads the table as an input"]
    assert (
        "skip  CUDA graph replay follows the table: no CUDA device here" in capsys.readouterr().out
    )


def test_a_table_baked_into_the_compiled_code_fails(monkeypatch, capsys):
    """Inductor's freezing turns buffers into constants: the compiled model then ignores every
    refill, which is what a vLLM change that baked the table would look like."""
    monkeypatch.setattr(torch._inductor.config, "freezing", True)
    assert main(SMALL) == 1
    assert "FAIL: compiled code reads the table as an input" in capsys.readouterr().err


def test_a_batch_with_fewer_than_two_requests_is_refused(capsys):
    assert main([*SMALL[:-1], "1"]) == 2
    assert "need --requests >= 2" in capsys.readouterr().err
