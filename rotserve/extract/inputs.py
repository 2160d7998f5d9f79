"""What an extraction reads besides the model: the prompt files, a chat template, provenance.

Provenance is what the plane's header records about its inputs (paths, file and prompt
hashes, the toy's weights hash), so a plane can be traced to, and checked against, its data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rotserve.extract.candidates import HARMFUL, HARMLESS, LABELS, ExtractionError
from rotserve.extract.config import ExtractConfig
from rotserve.extract.outputs import display_path
from rotserve.plane import file_sha256
from rotserve.prompts import Prompt, load_prompts, prompts_sha256

# Weights up to this size are hashed into the plane's header. The hash exists to tie the
# shipped toy plane (5 MB of weights) to its checkpoint; reading tens of GB of a large model
# only to hash them would add minutes to every run.
WEIGHTS_HASH_MAX_BYTES = 1 << 30


def load_prompt_files(cfg: ExtractConfig) -> dict[str, list[Prompt]]:
    """The harmful and harmless instructions named in cfg, each class checked for >= 2."""
    prompts = {
        HARMFUL: load_prompts(cfg.harmful, cfg.column, cfg.limit),
        HARMLESS: load_prompts(cfg.harmless, cfg.column, cfg.limit),
    }
    check_counts(prompts, {HARMFUL: cfg.harmful, HARMLESS: cfg.harmless})
    return prompts


def read_chat_template(path: str | None) -> str | None:
    """The Jinja text of --chat-template, or None to use the tokenizer's own template."""
    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        raise ExtractionError(f"--chat-template: file not found: {file}")
    return file.read_text(encoding="utf-8")


def provenance(cfg: ExtractConfig, prompts: Mapping[str, Sequence[Prompt]]) -> dict[str, Any]:
    """Per class: path, file and prompt hashes; for a small local checkpoint, its weights hash."""
    data: dict[str, Any] = {
        label: {
            "path": display_path(getattr(cfg, label)),
            "file_sha256": file_sha256(getattr(cfg, label)),
            "prompts_sha256": prompts_sha256(prompts[label]),
        }
        for label in LABELS
    }
    weights = Path(cfg.model) / "model.safetensors"
    if weights.is_file() and weights.stat().st_size <= WEIGHTS_HASH_MAX_BYTES:
        # A single small local checkpoint (the toy): its hash shows whether a shipped plane
        # still belongs to the weights beside it. Big or sharded models are named, not hashed.
        data["model"] = {"path": display_path(cfg.model), "weights_sha256": file_sha256(weights)}
    return data


def check_counts(prompts: Mapping[str, Sequence[Any]], sources: Mapping[str, Any]) -> None:
    """Each class needs at least 2 prompts; the error names the file (sources[label])."""
    for label in LABELS:
        n = len(prompts[label])
        if n < 2:
            raise ExtractionError(
                f"{sources[label]}: {n} {label} instruction(s); each class needs at least 2 "
                f"(a class mean from one prompt is that prompt, not a direction)"
            )


def as_prompt(p: Prompt | str, label: str, i: int) -> Prompt:
    """A bare instruction string becomes a Prompt with a stable id (harmful-1, ...)."""
    return p if isinstance(p, Prompt) else Prompt(id=f"{label}-{i + 1}", instruction=str(p))
