"""`rotserve convert-gguf` refuses what it cannot convert before reading anything.

The conversion itself runs on a real GGUF file in tests/test_real_weights.py.
"""

from __future__ import annotations

import pytest

from rotserve.convert import ConvertError, convert_gguf, main


def test_bad_inputs_are_clear_errors(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConvertError, match="not a .gguf file"):
        convert_gguf(tmp_path / "model.safetensors", tmp_path / "out")
    with pytest.raises(ConvertError, match="--dtype must be one of"):
        convert_gguf(gguf, tmp_path / "out", dtype="int4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("precious")
    with pytest.raises(ConvertError, match="not empty"):
        convert_gguf(gguf, tmp_path / "full")
    assert (tmp_path / "full" / "thesis.tex").read_text() == "precious"


def test_the_cli_exits_2_with_the_reason(tmp_path, capsys):
    assert main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "not a .gguf file" in capsys.readouterr().err
