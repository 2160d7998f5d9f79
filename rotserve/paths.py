"""Where rotserve's embedded defaults live, and what a --model value points at.

The toy refusal model, its plane and the team's instruction sets ship in the repository's
`data/` folder. An installed wheel (the Docker image) has no such folder next to it: point
`ROTSERVE_DATA_DIR` at a copy. The variable is read when a path is asked for, not at import,
so a test or a long-lived process that sets it later is honoured too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DATA_DIR_ENV = "ROTSERVE_DATA_DIR"
PLANE_FILENAME = "plane.safetensors"  # the plane a model directory ships, used when none is given
TOY_MODEL_NAME = "toy-refusal"
TOY_JUDGE_NAME = "toy-judge"
PROMPT_SETS = ("harmful", "harmless")


def data_dir() -> Path:
    """The folder holding the embedded defaults: $ROTSERVE_DATA_DIR, else the checkout's data/."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


def toy_model_dir() -> Path:
    """The embedded toy refusal model (a 4-layer Qwen2), the default model of every command."""
    return data_dir() / TOY_MODEL_NAME


def toy_judge_dir() -> Path:
    """The embedded toy judge (a 2-layer Qwen2 trained on the `behaviour` rubric)."""
    return data_dir() / TOY_JUDGE_NAME


def toy_plane() -> Path:
    """The toy model's shipped plane (the extractor's defaults on the shipped prompt sets)."""
    return toy_model_dir() / PLANE_FILENAME


def default_prompts() -> dict[str, Path]:
    """The shipped instruction sets, by dataset label: {"harmful": ..., "harmless": ...}."""
    return {label: data_dir() / "prompts" / f"{label}.jsonl" for label in PROMPT_SETS}


class ModelPathError(ValueError):
    """A --model (or --judge) value that is neither a model directory nor a hub id."""


def resolve_model(model: str, flag: str = "--model") -> tuple[str, bool]:
    """(absolute directory, True) for a local model, (hub id, False) for `org/name`."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelPathError(
                f"{flag} {model}: the directory has no config.json; is it a HF model?"
            )
        return str(path.resolve()), True
    if path.exists():
        raise ModelPathError(
            f"{flag} {model}: not a directory (give a HF model directory or hub id)"
        )
    if not _is_hub_id(model):
        if Path(model).resolve() == toy_model_dir().resolve():
            raise ModelPathError(
                f"the default toy model is missing at {toy_model_dir()}; point {DATA_DIR_ENV} "
                "at a folder holding rotserve's data/ (the repository's data/ folder), or pass "
                f"{flag}"
            )
        raise ModelPathError(f"{flag} {model}: no such directory (and not a hub id like org/name)")
    return model, False


def _is_hub_id(model: str) -> bool:
    """`name` or `org/name` as the HF hub spells them (anything else is meant as a path)."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) is not None and not model.startswith(".")


def shipped_tasks_dir() -> Path:
    """The lm-eval tasks rotserve ships for the toy (`rotserve capability --tasks toy_reply_mc`)."""
    return data_dir() / "tasks"
