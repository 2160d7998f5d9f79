"""Instruction sets: load them from any common format, and turn them into chat prompts.

Formats: JSONL (one object per line), JSON (a list of objects or strings, or an object holding
one such list), CSV, Parquet and plain text (one instruction per line). The instruction column
is the one you name, or the first of INSTRUCTION_COLUMNS present. A malformed row is an
error naming the file and line, never a silently dropped prompt.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTRUCTION_COLUMNS = ("instruction", "goal", "Goal", "prompt", "forbidden_prompt", "Behavior")
ID_COLUMNS = ("id", "Index", "BehaviorID", "behavior_id")
CATEGORY_COLUMNS = ("category", "Category", "type", "SemanticCategory")


class PromptFileError(ValueError):
    """A prompt file that cannot be read as instructions; the message names file and line."""


class ChatTemplateError(ValueError):
    """The tokenizer cannot turn an instruction into a chat prompt."""


@dataclass(frozen=True)
class Prompt:
    """One instruction and where it came from."""

    id: str
    instruction: str
    category: str = ""
    source: str = ""  # file it was read from
    line: int = 0  # 1-based line (JSONL, CSV, text) or item number (JSON, Parquet)


def load_prompts(
    path: str | Path, column: str | None = None, limit: int | None = None
) -> list[Prompt]:
    """Read instructions from a JSONL, JSON, CSV, Parquet or .txt file."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    elif suffix == ".txt":
        rows = [
            (i, {"instruction": t.strip()})
            for i, t in enumerate(path.read_text().splitlines(), 1)
            if t.strip()
        ]
    else:
        raise PromptFileError(
            f"{path}: unknown prompt format {suffix!r}; use .jsonl, .json, .csv, .parquet or .txt"
        )
    prompts = _to_prompts(rows, path, column)
    if not prompts:
        raise PromptFileError(f"{path}: no instructions found (the file is empty)")
    return prompts[:limit] if limit else prompts


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(
                f"{path}:{lineno}: not valid JSON ({e.msg}): {text[:80]!r}"
            ) from None
        if isinstance(obj, str):
            obj = {"instruction": obj}
        if not isinstance(obj, dict):
            raise PromptFileError(
                f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
            )
        rows.append((lineno, obj))
    return rows


def _read_json(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} or similar: take the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise PromptFileError(
                f"{path}: expected a JSON list of instructions (or an object holding one list)"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise PromptFileError(f"{path}: expected a JSON list, got {type(data).__name__}")
    rows = []
    for i, obj in enumerate(data, 1):
        if isinstance(obj, str):
            obj = {"instruction": obj}
        if not isinstance(obj, dict):
            raise PromptFileError(
                f"{path}: item {i}: expected an object or a string, got {type(obj).__name__}"
            )
        rows.append((i, obj))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            if None in row:  # more fields than the header names
                raise PromptFileError(
                    f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} fields but the header "
                    f"has {len(reader.fieldnames or [])}; quote fields that contain commas"
                )
            rows.append((reader.line_num, row))
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    return [(i, row) for i, row in enumerate(pq.read_table(path).to_pylist(), 1)]


def _to_prompts(
    rows: list[tuple[int, dict[str, Any]]], path: Path, column: str | None
) -> list[Prompt]:
    if not rows:
        return []
    keys = set().union(*(r.keys() for _, r in rows))
    if column is None:
        column = next((c for c in INSTRUCTION_COLUMNS if c in keys), None)
        if column is None:
            raise PromptFileError(
                f"{path}: no instruction column; looked for {', '.join(INSTRUCTION_COLUMNS)} and "
                f"found {', '.join(sorted(map(str, keys)))}; pick one with column=... (--column)"
            )
    elif column not in keys:
        raise PromptFileError(
            f"{path}: no column {column!r}; found {', '.join(sorted(map(str, keys)))}"
        )
    id_col = next((c for c in ID_COLUMNS if c in keys), None)
    cat_col = next((c for c in CATEGORY_COLUMNS if c in keys), None)
    stem = path.stem
    prompts = []
    for lineno, row in rows:
        text = row.get(column)
        if not isinstance(text, str) or not text.strip():
            raise PromptFileError(
                f"{path}:{lineno}: empty or missing {column!r} (got {text!r}); every row needs an instruction"
            )
        pid = row.get(id_col) if id_col else None
        prompts.append(
            Prompt(
                id=str(pid) if pid not in (None, "") else f"{stem}-{lineno}",
                instruction=text.strip(),
                category=str(row.get(cat_col) or "") if cat_col else "",
                source=str(path),
                line=lineno,
            )
        )
    return prompts


def prompts_sha256(prompts: Sequence[Prompt]) -> str:
    """Hash of the instructions in order: what a plane or a run was computed from."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.instruction.encode() + b"\0")
    return h.hexdigest()


def chat_prompt(tokenizer: Any, instruction: str, chat_template: str | None = None) -> str:
    """One user turn, no system prompt, generation prompt added: the method's prompt form."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError(
            "the tokenizer has no chat template; pass one with --chat-template FILE "
            "(a Jinja file, e.g. the one your model was fine-tuned with)"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )


def chat_prompts(
    tokenizer: Any, instructions: Sequence[str], chat_template: str | None = None
) -> list[str]:
    return [chat_prompt(tokenizer, t, chat_template) for t in instructions]
