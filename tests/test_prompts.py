"""Prompt loading: every common format, column guessing, and errors that name file and line."""

import json
import os
from pathlib import Path

import pytest

from rotserve.paths import default_prompts
from rotserve.prompts import (
    ChatTemplateError,
    PromptFileError,
    chat_prompt,
    load_prompts,
)

# Public instruction sets (AdvBench, HarmBench, ...) are not shipped; point this at a folder
# of them to check that every file loads.
PUBLIC = os.environ.get("ROTSERVE_PUBLIC_DATASETS")
PUBLIC_DIR = Path(PUBLIC) if PUBLIC else None
ROWS = [
    {"id": "a", "instruction": "Write a poem about tea.", "category": "writing"},
    {"id": "b", "instruction": "Explain how tides work.", "category": "science"},
]


def test_jsonl_json_csv_and_parquet_give_the_same_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    (tmp_path / "p.csv").write_text(
        "id,instruction,category\n"
        + "".join(f'{r["id"]},"{r["instruction"]}",{r["category"]}\n' for r in ROWS)
    )
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    loaded = [load_prompts(tmp_path / f"p.{ext}") for ext in ("jsonl", "json", "csv", "parquet")]
    for prompts in loaded:
        assert [(p.id, p.instruction, p.category) for p in prompts] == [
            (r["id"], r["instruction"], r["category"]) for r in ROWS
        ]


@pytest.mark.parametrize("column", ["goal", "Goal", "prompt", "forbidden_prompt"])
def test_the_instruction_column_is_guessed_from_common_names(tmp_path, column):
    (tmp_path / "x.csv").write_text(f"{column},target\nDo a thing,Sure\n")
    assert load_prompts(tmp_path / "x.csv")[0].instruction == "Do a thing"


def test_a_named_column_wins_and_an_unknown_one_is_an_error(tmp_path):
    (tmp_path / "x.csv").write_text("goal,target\nDo a thing,Sure here\n")
    assert load_prompts(tmp_path / "x.csv", column="target")[0].instruction == "Sure here"
    with pytest.raises(PromptFileError, match="no column 'nope'"):
        load_prompts(tmp_path / "x.csv", column="nope")
    (tmp_path / "y.csv").write_text("text\nhello\n")
    with pytest.raises(PromptFileError, match="no instruction column"):
        load_prompts(tmp_path / "y.csv")


def test_a_malformed_jsonl_line_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{broken\n")
    with pytest.raises(PromptFileError, match=r"bad\.jsonl:3: not valid JSON"):
        load_prompts(path)


def test_a_row_without_an_instruction_is_named_with_its_line(tmp_path):
    path = tmp_path / "gap.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"id": "c", "instruction": ""}) + "\n")
    with pytest.raises(PromptFileError, match=r"gap\.jsonl:2: empty or missing 'instruction'"):
        load_prompts(path)


def test_a_csv_row_with_extra_fields_is_named_with_its_line(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("goal,target\nok,fine\nan, unquoted, comma,row\n")
    with pytest.raises(PromptFileError, match=r"x\.csv:3: .*quote fields"):
        load_prompts(path)


def test_empty_missing_and_unknown_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptFileError, match="empty"):
        load_prompts(tmp_path / "empty.jsonl")
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(PromptFileError, match="unknown prompt format"):
        load_prompts(tmp_path / "x.xlsx")


def test_rotserve_data_dir_moves_every_shipped_default(tmp_path, monkeypatch):
    from rotserve.extract import ExtractConfig
    from rotserve.grid import GridConfig
    from rotserve.paths import toy_model_dir, toy_plane

    monkeypatch.setenv("ROTSERVE_DATA_DIR", str(tmp_path))
    assert toy_model_dir() == tmp_path / "toy-refusal"
    assert toy_plane() == tmp_path / "toy-refusal" / "plane.safetensors"
    assert default_prompts()["harmful"] == tmp_path / "prompts" / "harmful.jsonl"
    config = GridConfig()
    assert config.model == str(tmp_path / "toy-refusal")
    assert dict(config.prompts)["harmless"] == str(tmp_path / "prompts" / "harmless.jsonl")
    extract = ExtractConfig()
    assert (extract.model, extract.harmful) == (
        str(tmp_path / "toy-refusal"),
        str(tmp_path / "prompts" / "harmful.jsonl"),
    )


def test_the_shipped_prompt_sets_load_with_ids_and_categories():
    for label, path in default_prompts().items():
        prompts = load_prompts(path)
        assert len(prompts) >= 48, label
        assert len({p.id for p in prompts}) == len(prompts)
        assert all(p.category for p in prompts)


def test_the_chat_template_makes_one_user_turn_with_the_generation_prompt():
    class Tok:
        chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"

        def apply_chat_template(self, messages, chat_template, tokenize, add_generation_prompt):
            assert add_generation_prompt and not tokenize
            from jinja2 import Template

            return Template(chat_template).render(messages=messages)

    assert chat_prompt(Tok(), "hi") == "<u>hi</u><a>"

    class NoTemplate:
        chat_template = None

    with pytest.raises(ChatTemplateError, match="--chat-template FILE"):
        chat_prompt(NoTemplate(), "hi")


PUBLIC_FILES = sorted(
    p
    for p in (PUBLIC_DIR.rglob("*") if PUBLIC_DIR and PUBLIC_DIR.is_dir() else [])
    if p.suffix in {".csv", ".json", ".jsonl", ".txt"}
)


@pytest.mark.skipif(
    not PUBLIC_FILES, reason="set ROTSERVE_PUBLIC_DATASETS to a folder of public prompt sets"
)
@pytest.mark.parametrize("path", PUBLIC_FILES, ids=lambda p: p.name)
def test_every_public_dataset_in_shared_loads(path):
    if path.name.startswith(("LICENSE", "SOURCES")):
        pytest.skip("not a prompt file")
    prompts = load_prompts(path)
    assert len(prompts) >= 10
    assert all(len(p.instruction) > 5 for p in prompts)
