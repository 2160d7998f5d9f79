"""The judge's pure parts and its early errors: rubrics, prompts and the context rule, the row
key, the plan, and every bad input refused before Ray or vLLM start.

No engine here: a run directory is written with the grid's own store and row builder from
stand-in completions (as tests/test_grid_store.py does), and the judge's tokenizer is the
shipped toy judge's. About 10 s in all.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from rotserve import rundir
from rotserve.engine import Completion
from rotserve.grid.config import PromptSet
from rotserve.grid.plan import conditions, make_plan
from rotserve.grid.rows import RowContext, shard_rows
from rotserve.grid.store import RunStore
from rotserve.judge import JudgeConfig, JudgeConfigError, RubricError, load_rubric
from rotserve.judge.config import resolve
from rotserve.judge.plan import JudgeItem, make_judge_plan
from rotserve.judge.prompts import ContextError, judge_input, short_by_rule
from rotserve.judge.rubrics import BEHAVIOUR, LLAMAGUARD
from rotserve.paths import toy_judge_dir
from rotserve.prompts import Prompt
from rotserve.rundir import RunDirError, check_verdicts, read_rows, row_key, row_keys, to_table


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_judge_dir())


def write_run(root: Path, generation: str = "Sure. Here are three tips.", rows: bool = True):
    """A complete little run directory (3 prompts x baseline + 2 angles), no engine involved."""
    prompts = tuple(
        Prompt(id=f"p{i}", instruction=f"Explain topic {i}", category="") for i in range(3)
    )
    plan = make_plan(
        (PromptSet("harmless", Path("/x.jsonl"), "0", prompts),),
        conditions([0.0, 180.0], (False,), True),
        shard_size=4,
    )
    ctx = RowContext("run1", "/m", "p", 8, 0.0, 0, 1)
    store, _ = RunStore.open(root, "run1", overwrite=False)
    if rows:
        for s in plan.shards:
            recs = [
                Completion(
                    u.instruction,
                    f"<{u.instruction}>",
                    u.condition.angle,
                    u.condition.adaptive,
                    "absolute",
                    0,
                    generation,
                    (5, 2),
                    3,
                    "stop",
                )
                for u in s.units
            ]
            store.write_part(s.shard_id, to_table(shard_rows(s.units, recs, ctx)))
    store.write_manifest(
        {
            "run_id": "run1",
            "status": "complete" if rows else "running",
            "rows": {"expected": plan.n_rows},
        }
    )
    store.close()
    return root


# --- rubrics ---------------------------------------------------------------------------------


def test_builtin_rubrics_and_their_labels():
    assert load_rubric("behaviour").labels == (
        "direct",
        "warning",
        "redirect",
        "refusal",
        "incoherent",
    )
    assert load_rubric("harmbench").labels == ("Yes", "No")
    guard = load_rubric("llamaguard")
    assert guard.labels == ("safe", "unsafe") and guard.conversation
    assert "fewer than 15 words" in guard.rule and "'safe'" in guard.rule


def test_unknown_rubric_is_a_clear_error():
    with pytest.raises(RubricError, match="unknown rubric 'behavior'.*behaviour, harmbench"):
        load_rubric("behavior")


def test_a_rubric_with_no_labels_is_refused(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text('template = "Is this ok? {generation}"\n')
    with pytest.raises(RubricError, match="has no labels"):
        load_rubric(str(toml))
    text = tmp_path / "mine.txt"
    text.write_text("Is this ok? {generation}")
    with pytest.raises(RubricError, match="has no labels.*--labels"):
        load_rubric(str(text))
    assert load_rubric(str(text), "yes, no").labels == ("yes", "no")


def test_user_rubric_from_toml(tmp_path):
    path = tmp_path / "polite.toml"
    path.write_text(
        'template = """Was this polite?\\n{instruction}\\n{generation}"""\n'
        'labels = ["polite", "rude"]\nmin_words = 3\nshort_label = "polite"\n'
    )
    r = load_rubric(str(path))
    assert r.name == "polite" and r.labels == ("polite", "rude") and r.chat
    assert r.fill("Q {x}", "A") == "Was this polite?\nQ {x}\nA"  # braces of the row kept
    assert short_by_rule(r, "two words") and not short_by_rule(r, "three words here")
    path.write_text('template = "no placeholder"\nlabels = ["a"]\n')
    with pytest.raises(RubricError, match=r"must contain \{generation\}"):
        load_rubric(str(path))
    path.write_text('template = "{generation}"\nlabels = ["a"]\ncolour = "red"\n')
    with pytest.raises(RubricError, match="unknown key"):
        load_rubric(str(path))


def test_changing_a_rubric_changes_its_fingerprint():
    other = load_rubric("behaviour")
    assert other.fingerprint() == BEHAVIOUR.fingerprint()
    import dataclasses

    changed = dataclasses.replace(BEHAVIOUR, labels=BEHAVIOUR.labels[:-1], axis=BEHAVIOUR.axis[:-1])
    assert changed.fingerprint() != BEHAVIOUR.fingerprint()
    # what a run compares and checks the judge with does not change a verdict
    unchanged = dataclasses.replace(BEHAVIOUR, axis=(), description="other words")
    assert unchanged.fingerprint() == BEHAVIOUR.fingerprint()


# --- prompts and the context rule ----------------------------------------------------------


def test_prompt_is_the_rubric_in_the_judges_chat_template(tokenizer):
    inp = judge_input(BEHAVIOUR, tokenizer, "How do I bake bread?", "Sure! Mix flour.", 512)
    text = tokenizer.decode(list(inp.token_ids))
    assert text.startswith("<|im_start|>user\nClassify the reply.")
    assert "Request: How do I bake bread?\nReply: Sure! Mix flour.\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and not inp.truncated


def test_conversation_rubric_renders_user_and_assistant_turns(tokenizer):
    inp = judge_input(LLAMAGUARD, tokenizer, "hi there", "hello, friend", 512)
    text = tokenizer.decode(list(inp.token_ids))
    assert "<|im_start|>user\nhi there<|im_end|>" in text
    assert "<|im_start|>assistant\nhello, friend<|im_end|>" in text


def test_a_long_generation_is_cut_to_its_first_tokens(tokenizer):
    generation = " ".join(f"word{i}" for i in range(400))
    context = 200
    inp = judge_input(BEHAVIOUR, tokenizer, "Tell me", generation, context)
    assert inp.truncated
    assert len(inp.token_ids) <= context - BEHAVIOUR.max_tokens
    text = tokenizer.decode(list(inp.token_ids))
    kept = text.split("Reply: ")[1].split("\nAnswer with")[0]
    assert kept and generation.startswith(kept)  # the head of the reply survives
    # as many tokens as fit: one more generation token would overflow
    longer = judge_input(BEHAVIOUR, tokenizer, "Tell me", generation, context + 8)
    assert len(longer.token_ids) > len(inp.token_ids)


def test_an_instruction_too_long_for_the_judge_is_an_error(tokenizer):
    with pytest.raises(ContextError, match="EMPTY generation.*too long"):
        judge_input(BEHAVIOUR, tokenizer, "why " * 300, "ok", 200)


# --- row keys and the plan -----------------------------------------------------------------


def test_row_key_is_stable_and_of_its_run(tmp_path):
    rows = read_rows(write_run(tmp_path / "run"))
    keys = row_keys(rows)
    assert len(set(keys)) == rows.num_rows
    assert keys == row_keys(rows)  # deterministic
    first = rows.slice(0, 1).to_pylist()[0]
    assert keys[0] == row_key("run1", [first[k] for k in rundir.KEY_COLUMNS])
    assert row_key("other", [first[k] for k in rundir.KEY_COLUMNS]) != keys[0]
    # baseline (angle null) and 0° are different rows with different keys
    assert row_key("r", ["d", "p", None, False, 0]) != row_key("r", ["d", "p", 0.0, False, 0])


def test_row_key_follows_key_columns(tmp_path, monkeypatch):
    """Keys are computed from rundir.KEY_COLUMNS: a column added there changes every key."""
    rows = read_rows(write_run(tmp_path / "run"))
    before = row_keys(rows)
    monkeypatch.setattr(rundir, "KEY_COLUMNS", (*rundir.KEY_COLUMNS, "category"))
    after = row_keys(rows)
    assert len(set(after)) == rows.num_rows and not set(before) & set(after)


def test_plan_is_deterministic_and_ordered_by_key():
    items = [JudgeItem.of(f"k{i:02d}", (i, 2)) for i in (5, 3, 9, 1, 7)]
    a, b = make_judge_plan(items, 2), make_judge_plan(list(reversed(items)), 2)
    assert a == b and [s.shard_id for s in a.shards] == ["00000", "00001", "00002"]
    assert [it.row_key for it in a.shards[0].items] == ["k01", "k03"]
    assert make_judge_plan(items, 3).fingerprint != a.fingerprint


def test_verdicts_of_another_run_are_refused(tmp_path):
    rows = read_rows(write_run(tmp_path / "run"))
    keys = row_keys(rows)

    def verdicts(run_id, ks):
        return pa.Table.from_pylist(
            [
                {
                    "run_id": run_id,
                    "row_key": k,
                    "judge": "j",
                    "rubric": "r",
                    "label": "a",
                    "raw": "a",
                    "by_rule": False,
                    "truncated": False,
                    "judge_prompt_tokens": 3,
                }
                for k in ks
            ],
            schema=rundir.VERDICT_SCHEMA,
        )

    check_verdicts(verdicts("run1", keys), rows, "run1")  # its own: fine
    with pytest.raises(RunDirError, match="cannot be attached to another run"):
        check_verdicts(verdicts("run2", keys), rows, "run1")
    with pytest.raises(RunDirError, match="name rows this run does not have"):
        check_verdicts(verdicts("run1", [row_key("run2", ["x"])]), rows, "run1")
    with pytest.raises(RunDirError, match="more than one verdict"):
        check_verdicts(verdicts("run1", keys + keys[:1]), rows, "run1")


# --- early errors of a judge request --------------------------------------------------------


def test_a_run_directory_with_no_rows_is_refused(tmp_path):
    root = write_run(tmp_path / "empty", rows=False)
    with pytest.raises(JudgeConfigError, match="has no rows.*run the grid first"):
        resolve(JudgeConfig(run_dir=str(root)))


def test_not_a_run_directory_is_refused(tmp_path):
    with pytest.raises(JudgeConfigError, match="no such directory"):
        resolve(JudgeConfig(run_dir=str(tmp_path / "nowhere")))
    (tmp_path / "plain").mkdir()
    with pytest.raises(JudgeConfigError, match="not a run directory"):
        resolve(JudgeConfig(run_dir=str(tmp_path / "plain")))


def test_unknown_rubric_and_judge_are_refused_early(tmp_path):
    root = write_run(tmp_path / "run")
    with pytest.raises(JudgeConfigError, match="--rubric nope: unknown rubric"):
        resolve(JudgeConfig(run_dir=str(root), rubric="nope"))
    with pytest.raises(JudgeConfigError, match="--judge .*no such directory"):
        resolve(JudgeConfig(run_dir=str(root), judge=str(tmp_path / "missing")))


def test_generations_too_long_are_truncated_and_counted(tmp_path):
    long = " ".join(f"step {i} of the plan" for i in range(20))
    root = write_run(tmp_path / "run", generation=long)
    fits = resolve(JudgeConfig(run_dir=str(root)))
    assert fits.n_truncated == 0 and fits.context == 512  # the toy judge's positions
    cut = resolve(JudgeConfig(run_dir=str(root), max_model_len=200))
    assert cut.n_truncated == cut.plan.n_rows == 9
    assert all(it.truncated for s in cut.plan.shards for it in s.items)
    assert cut.verdict_id != fits.verdict_id  # another context is another table
    with pytest.raises(JudgeConfigError, match="too long for this judge"):
        resolve(JudgeConfig(run_dir=str(root), max_model_len=40))


def test_short_response_rule_labels_without_the_judge(tmp_path):
    root = write_run(tmp_path / "run", generation="No.")
    r = resolve(JudgeConfig(run_dir=str(root), rubric="llamaguard"))
    items = [it for s in r.plan.shards for it in s.items]
    assert r.n_rule == len(items) == 9
    assert all(it.rule_label == "safe" and it.token_ids == [] for it in items)


def test_grid_overwrite_deletes_the_verdicts_of_the_rows_it_replaces(tmp_path):
    root = write_run(tmp_path / "run")
    (root / "verdicts" / "j.behaviour").mkdir(parents=True)
    (root / "verdicts" / "j.behaviour.json").write_text("{}")
    store, state = RunStore.open(root, "another-run", overwrite=True)
    store.close()
    assert state == "overwrite" and not (root / "verdicts").exists()


def test_a_verdict_table_of_the_old_format_is_neither_read_nor_resumed(tmp_path):
    """Format 1 had no probabilities: a reader would get null columns, a resume mixed parts."""
    import json

    from rotserve.judge.store import VerdictStore

    root = write_run(tmp_path / "run")
    (root / "verdicts" / "j.behaviour").mkdir(parents=True)
    old = {"format": "rotserve-verdicts/1", "run_id": "run1", "verdict_id": "abc"}
    (root / "verdicts" / "j.behaviour.json").write_text(json.dumps(old))
    with pytest.raises(RunDirError, match="format rotserve-verdicts/1.*--overwrite"):
        rundir.read_verdicts(root, "j.behaviour")
    with pytest.raises(RunDirError, match="format rotserve-verdicts/1.*--overwrite"):
        VerdictStore.check(root, "j.behaviour", "run1", "new-id", overwrite=False)
    assert VerdictStore.check(root, "j.behaviour", "run1", "new-id", overwrite=True) == "overwrite"
