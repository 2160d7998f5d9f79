"""The judge canary's pure parts: the shipped anchors, a rubric file's own, the grading rule, and
the anchors' prompts built by the very function that builds the rows'. No engine (the real
canary runs in tests/test_judge_run.py: the toy judge passes it, a constant judge is stopped).
About 5 s.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_judge import write_run

from rotserve.fanout import FanOutError
from rotserve.judge import JudgeConfig, JudgeConfigError, RubricError, load_rubric
from rotserve.judge.anchors import (
    Anchor,
    AnchorError,
    anchors_for,
    grade,
)
from rotserve.judge.config import item_of, resolve
from rotserve.judge.job import canary_failure
from rotserve.judge.prompts import short_by_rule
from rotserve.judge.rubrics import BEHAVIOUR, BUILTIN
from rotserve.paths import DATA_DIR_ENV, toy_judge_dir
from rotserve.scoring import refusal_marker

ANCHOR_KINDS = {"refusal", "direct", "warning", "redirect", "broken"}


def verdict(anchor: Anchor, label: str, p: float = 0.9) -> dict:
    return {"row_key": anchor.row_key, "label": label, "raw": label, "probs": [(label, p)]}


# --- the shipped anchors -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN))
def test_every_builtin_rubric_ships_anchors_for_each_label_and_kind(name):
    rubric = BUILTIN[name]
    anchors = anchors_for(rubric)
    assert len(anchors) >= 7
    assert {a.label for a in anchors} == set(rubric.labels)
    kinds = {a.kind for a in anchors}
    assert ANCHOR_KINDS <= kinds, kinds
    if name != "behaviour":
        assert "benign" in kinds  # a harmless answer is a public judge's clear no/safe
    for a in anchors:  # the judge is asked every one: none decided by the short-response rule
        assert not short_by_rule(rubric, a.generation), a.id


@pytest.mark.parametrize("name", list(BUILTIN))
def test_the_anchors_are_honest_about_refusals(name):
    """A refusal anchor opens with a keyword marker (a canonical refusal); no other anchor holds
    one, so no anchor's label rests on the markers' known blind spots."""
    for a in anchors_for(BUILTIN[name]):
        marker = refusal_marker(a.generation)
        if a.kind == "refusal":
            assert marker is not None and a.generation.startswith(marker), a.id
        else:
            assert marker is None, (a.id, marker)


def test_the_behaviour_anchors_say_each_label_of_the_rubric():
    by_kind = {}
    for a in anchors_for(BEHAVIOUR):
        by_kind.setdefault(a.kind, set()).add(a.label)
    assert by_kind == {
        "refusal": {"refusal"},
        "direct": {"direct"},
        "warning": {"warning"},
        "redirect": {"redirect"},
        "broken": {"incoherent"},
    }


def test_missing_anchor_files_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(AnchorError, match=r"anchors of rubric 'behaviour' are missing.*ROTSERVE"):
        anchors_for(BEHAVIOUR)


# --- a rubric file's anchors -------------------------------------------------------------------

TOML = '''template = """Was the reply polite?\\n{instruction}\\n{generation}"""
labels = ["polite", "rude"]
axis = { polite = "comply", rude = "refuse" }
'''


def anchor_toml(label: str, i: int) -> str:
    return (
        f'[[anchors]]\nid = "a{i}"\nkind = "{label}"\nlabel = "{label}"\n'
        f'instruction = "Say hi"\ngeneration = "reply {i}"\n'
    )


def test_a_rubric_file_ships_its_own_anchors_and_axis(tmp_path):
    path = tmp_path / "polite.toml"
    path.write_text(TOML + anchor_toml("polite", 1) + anchor_toml("rude", 2))
    r = load_rubric(str(path))
    assert r.axis_map == {"polite": "comply", "rude": "refuse"}
    assert [a.id for a in anchors_for(r)] == ["a1", "a2"]
    # ... or from a JSONL file beside it
    line = {"id": "b", "kind": "k", "label": "rude", "instruction": "i", "generation": "g"}
    (tmp_path / "polite.jsonl").write_text(
        json.dumps(line) + "\n" + json.dumps({**line, "id": "c", "label": "polite"}) + "\n"
    )
    path.write_text(TOML + 'anchors = "polite.jsonl"\n')
    assert [a.label for a in anchors_for(load_rubric(str(path)))] == ["rude", "polite"]
    (tmp_path / "polite.jsonl").write_text(json.dumps(line) + "\n{not json\n")
    with pytest.raises(RubricError, match=r"polite.jsonl line 2: not JSON"):
        load_rubric(str(path))


@pytest.mark.parametrize(
    ("anchors", "message"),
    [
        (anchor_toml("polite", 1) + anchor_toml("polite", 2), r"expect only \['polite'\]"),
        (anchor_toml("polite", 1) + anchor_toml("cheeky", 2), r"\['a2'\] expect a label"),
        (anchor_toml("polite", 1) + anchor_toml("rude", 1), "two anchors share an id"),
        ('[[anchors]]\nid = "x"\nlabel = "rude"\n', r"missing or empty \['kind', 'instruct"),
    ],
)
def test_bad_anchors_in_a_rubric_file_are_refused(tmp_path, anchors, message):
    path = tmp_path / "polite.toml"
    path.write_text(TOML + anchors)
    with pytest.raises(RubricError, match=message):
        load_rubric(str(path))


def test_a_bad_axis_in_a_rubric_file_is_refused(tmp_path):
    path = tmp_path / "polite.toml"
    path.write_text(TOML.replace('rude = "refuse"', 'rude = "bad"'))
    with pytest.raises(RubricError, match="values not on the axis"):
        load_rubric(str(path))


# --- the rule ----------------------------------------------------------------------------------


def test_grading_allows_one_miss_and_never_one_label_for_everything():
    anchors = anchors_for(BEHAVIOUR)
    right = [verdict(a, a.label) for a in anchors]
    assert grade(anchors, right).passed and grade(anchors, right).misses == 0
    one = [verdict(a, "direct" if a.id == "warning-knife" else a.label) for a in anchors]
    assert grade(anchors, one).passed and grade(anchors, one).misses == 1
    two = [verdict(a, "direct" if a.kind == "warning" else a.label) for a in anchors]
    result = grade(anchors, two)
    assert not result.passed and result.misses == 2
    assert "judge canary failed: 8 of 10 anchors right (at most 1 miss allowed)" in (
        result.summary()
    )
    assert "warning-lock: warning -> direct (P 0.90) MISS" in result.summary()
    flat = grade(anchors, [verdict(a, "refusal") for a in anchors])
    assert not flat.passed and flat.constant and "ONE LABEL FOR EVERY ANCHOR" in flat.summary()
    assert flat.as_dict()["labels_given"] == {"refusal": 10}
    # fewer than 6 anchors: every one must be right
    few = anchors[:4]
    one_miss = [verdict(a, a.label) for a in few[:3]] + [verdict(few[3], "refusal")]
    assert grade(few, one_miss).misses == 1 and not grade(few, one_miss).passed
    assert "\n" not in result.summary()  # one line: it crosses the fan-out as an error's last


def test_the_canary_failure_is_read_back_from_the_fan_out_error():
    err = FanOutError(
        "the engine failed to start: rotserve.judge.config.JudgeCanaryError: judge canary "
        "failed: 2 of 10 anchors right\n\nTraceback ...\njudge canary failed: 2 of 10"
    )
    assert canary_failure(err) == "judge canary failed: 2 of 10 anchors right"
    assert canary_failure(FanOutError("the engine failed to start: OOM")) is None


# --- the anchors travel the rows' path ----------------------------------------------------------


def test_resolve_builds_the_anchors_prompts_as_it_builds_the_rows(tmp_path):
    from transformers import AutoTokenizer

    run = write_run(tmp_path / "run")
    r = resolve(JudgeConfig(run_dir=str(run)))
    assert r.canary is not None and not r.canary.accept_failure
    tok = AutoTokenizer.from_pretrained(toy_judge_dir())
    for anchor, item in zip(r.canary.anchors, r.canary.items, strict=True):
        want, _ = item_of(
            BEHAVIOUR,
            tok,
            anchor.row_key,
            anchor.instruction,
            anchor.generation,
            r.context,
            r.shape,
        )
        assert item == want and item.n_tokens > 0
    # not part of what makes the verdicts: the same verdict id with or without it
    skipped = resolve(JudgeConfig(run_dir=str(run), skip_canary=True))
    assert skipped.canary is None and "--skip-judge-canary" in skipped.canary_note
    assert skipped.verdict_id == r.verdict_id
    accepted = resolve(JudgeConfig(run_dir=str(run), accept_canary_failure=True))
    assert accepted.canary.accept_failure and accepted.verdict_id == r.verdict_id
    with pytest.raises(JudgeConfigError, match="contradict each other"):
        resolve(JudgeConfig(run_dir=str(run), skip_canary=True, accept_canary_failure=True))


def test_a_rubric_file_without_anchors_runs_without_a_canary(tmp_path):
    run = write_run(tmp_path / "run")
    path = tmp_path / "polite.toml"
    path.write_text(TOML)
    r = resolve(JudgeConfig(run_dir=str(run), rubric=str(path)))
    assert r.canary is None and "ships no anchors" in r.canary_note
    # a built-in's twin under another name is a rubric file: it brings its own anchors or none
    twin = dataclasses.replace(BEHAVIOUR, name="mine")
    assert anchors_for(twin) == ()
