"""The files an extraction writes: the plane, and beside it the candidate table and figure.

plane.safetensors -> plane.candidates.json, plane.candidates.csv, plane.candidates.png
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from rotserve.extract.result import ExtractionResult
from rotserve.paths import data_dir


def repo_root() -> Path:
    """The folder holding the data folder: the checkout, or wherever ROTSERVE_DATA_DIR sits."""
    return data_dir().parent


def display_path(path: str | Path) -> str:
    """A path inside the rotserve checkout as repo-relative (data/toy-refusal), else as given.

    So the shipped plane names its model and prompt files the same way on every machine.
    """
    text = str(path)
    try:
        return Path(text).resolve().relative_to(repo_root()).as_posix()
    except (ValueError, OSError):
        return text


def side_paths(out: Path) -> dict[str, Path]:
    """plane.safetensors -> plane.candidates.json / .csv / .png beside it."""
    stem = out.name.removesuffix(".safetensors")
    return {
        "plane": out,
        "json": out.with_name(f"{stem}.candidates.json"),
        "csv": out.with_name(f"{stem}.candidates.csv"),
        "png": out.with_name(f"{stem}.candidates.png"),
    }


def write_outputs(result: ExtractionResult, out: Path, figure: bool = True) -> dict[str, Path]:
    """Write the plane and its side files; returns their paths by kind (plane/json/csv/png)."""
    paths = side_paths(out)
    result.plane.save(paths["plane"])
    meta = result.plane.meta
    rows = [row.as_dict() for row in result.table]
    doc = {
        "model": meta.model,
        "hidden_size": meta.hidden_size,
        "plane": {"path": str(paths["plane"]), "plane_id": result.plane.plane_id},
        "method": meta.method,
        "data": meta.data,
        "candidates": rows,
    }
    # allow_nan=False: the rows hold None for missing statistics, so the file is strict JSON
    # that any reader (jq, JavaScript) accepts.
    paths["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if figure:
        # matplotlib is imported only when a figure is asked for: it is slow to import.
        from rotserve.extract.figure import candidates_figure

        coords = torch.stack(
            [result.candidates.d @ result.plane.b1, result.candidates.d @ result.plane.b2], 1
        )
        candidates_figure(result.table, coords.numpy(), paths["png"], title=_figure_title(result))
    else:
        del paths["png"]
    return paths


def _figure_title(result: ExtractionResult) -> str:
    m = result.plane.meta.method
    b1 = (
        "random b1"
        if m["random_b1"]
        else f"b1 {m['select']}" + (f" @ {m['site_name']}" if m["site_name"] else "")
    )
    return (
        f"{Path(result.plane.meta.model).name or result.plane.meta.model}: {b1}, b2 {m['second']}"
    )
