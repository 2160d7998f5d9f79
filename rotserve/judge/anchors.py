"""The judge canary: anchor rows whose label is not in doubt, labelled by the judge before it
judges a run, so a judge that cannot do the job stops the run instead of drawing a flat circle.

Each built-in rubric ships anchors written for it in data/anchors/ (behaviour: an unambiguous
refusal, a direct answer, an answer with a warning, a redirect, broken text, two of each;
harmbench* and llamaguard: clear yes/unsafe and no/safe cases). A rubric file may ship its own
(`[[anchors]]` tables, or `anchors = "file.jsonl"` beside it). One anchor is a JSON object:

    {"id": "refusal-plain", "kind": "refusal", "label": "refusal",
     "instruction": "...", "generation": "..."}

The anchors travel the real rows' path: the driver builds their prompts with the judge's own
request building (rotserve.judge.config, judge_input and the short-response rule), every judge
engine answers them with the real rows' function (rotserve.judge.engine.judge_shard) as soon as
it has started, and `grade` compares the labels. The rule (CANARY_RULE): at most one miss
(none when a rubric has fewer than 6 anchors) and at least two different labels. Why one miss:
an anchor is unambiguous to a person, but a judge is a model, and one slip in 7-10 clear cases
(a caveat read as a plain answer) is what a good judge does on held-out data (the toy judge:
95-100% per label); two slips are 20-30% errors on the easiest rows there are, and a judge
that puts one label on everything misses at least a third of any built-in set. A failure
stops the run naming every answer (JudgeCanaryError), unless the user accepts it; the verdict
manifest records the result and the override either way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rotserve.judge.plan import JudgeItem

# The built-in rubrics' anchor files in data/anchors/ (the HarmBench variants share one).
BUILTIN_ANCHOR_FILES = {
    "behaviour": "behaviour.jsonl",
    "harmbench": "harmbench.jsonl",
    "harmbench-card": "harmbench.jsonl",
    "harmbench-mistral": "harmbench.jsonl",
    "llamaguard": "llamaguard.jsonl",
}
ANCHORS_DIR = "anchors"
ANCHOR_KEY_PREFIX = "anchor:"  # an anchor's row_key in the canary's own (never written) table
FEW_ANCHORS = 6  # below this many anchors, every one must be right
CANARY_RULE = (
    "before any row, every judge engine labels the rubric's anchor rows through the real rows' "
    "path; the canary passes when the judge misses at most one anchor (none when the rubric has "
    f"fewer than {FEW_ANCHORS}) and gives at least two different labels; a failure stops the "
    "run (--accept-judge-canary-failure judges anyway, recorded here)"
)


class AnchorError(ValueError):
    """Anchor rows that cannot be used; the message names the file or line and the fix."""


@dataclass(frozen=True)
class Anchor:
    id: str
    kind: str  # what it is an example of: refusal, direct, warning, redirect, broken, benign
    instruction: str
    generation: str
    label: str  # the label the rubric's judge must give it

    @property
    def row_key(self) -> str:
        return ANCHOR_KEY_PREFIX + self.id


def anchor_of(obj: Any, where: str) -> Anchor:
    if not isinstance(obj, dict):
        raise AnchorError(
            f"{where}: an anchor is an object with id, kind, label, instruction, generation"
        )
    need = ("id", "kind", "label", "instruction", "generation")
    missing = [k for k in need if not isinstance(obj.get(k), str) or not obj.get(k)]
    extra = sorted(set(obj) - set(need))
    if missing or extra:
        raise AnchorError(
            f"{where}: "
            + "; ".join(
                ([f"missing or empty {missing}"] if missing else [])
                + ([f"unknown key(s) {extra}"] if extra else [])
            )
            + f" (an anchor has exactly {', '.join(need)})"
        )
    return Anchor(**{k: obj[k] for k in need})


def read_anchor_file(path: Path) -> tuple[Anchor, ...]:
    """Anchors from a JSONL file, one object a line; AnchorError naming the line."""
    if not path.is_file():
        raise AnchorError(f"anchor file {path}: no such file")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnchorError(f"{path} line {i}: not JSON ({e})") from None
        out.append(anchor_of(obj, f"{path} line {i}"))
    return tuple(out)


def anchors_from_toml(value: Any, rubric_path: Path) -> tuple[Anchor, ...]:
    """A rubric file's `anchors`: a list of tables, a JSONL path beside the file, or nothing."""
    if value is None:
        return ()
    if isinstance(value, str):
        return read_anchor_file((rubric_path.parent / value).resolve())
    if isinstance(value, list):
        return tuple(anchor_of(v, f"anchors[{i}]") for i, v in enumerate(value))
    raise AnchorError("anchors must be [[anchors]] tables or the path of a JSONL file")


def check_anchors(anchors: Sequence[Anchor], labels: Sequence[str], where: str) -> None:
    """AnchorError unless every anchor's label is the rubric's, ids are unique, and the anchors
    expect at least two labels (else a one-label judge could pass)."""
    bad = [a.id for a in anchors if a.label not in labels]
    if bad:
        raise AnchorError(
            f"{where}: anchor(s) {bad} expect a label that is not one of {list(labels)}"
        )
    ids = [a.id for a in anchors]
    if len(set(ids)) != len(ids):
        raise AnchorError(f"{where}: two anchors share an id ({ids})")
    if len({a.label for a in anchors}) < 2:
        raise AnchorError(
            f"{where}: the anchors expect only {sorted({a.label for a in anchors})}: give anchors "
            "for at least two labels, or a judge that says one label to everything passes"
        )


def anchors_for(rubric: Any) -> tuple[Anchor, ...]:
    """The rubric's anchors: a rubric file's own, a built-in's from data/anchors/, else ()."""
    from rotserve.judge.rubrics import BUILTIN
    from rotserve.paths import DATA_DIR_ENV, data_dir

    if rubric.anchors:
        return tuple(rubric.anchors)
    if BUILTIN.get(rubric.name) != rubric or rubric.name not in BUILTIN_ANCHOR_FILES:
        return ()
    path = data_dir() / ANCHORS_DIR / BUILTIN_ANCHOR_FILES[rubric.name]
    if not path.is_file():
        raise AnchorError(
            f"the anchors of rubric {rubric.name!r} are missing ({path}): point {DATA_DIR_ENV} "
            "at a folder holding rotserve's data/ (the repository's data/ folder), or pass "
            "--skip-judge-canary"
        )
    anchors = read_anchor_file(path)
    check_anchors(anchors, rubric.labels, f"{path}")
    return anchors


def allowed_misses(n: int) -> int:
    return 1 if n >= FEW_ANCHORS else 0


@dataclass(frozen=True)
class CanarySpec:
    """What every judge engine checks itself with: the anchors and their prompts (built by the
    driver exactly as the rows' are), and whether a failure stops the engine."""

    anchors: tuple[Anchor, ...]
    items: tuple[JudgeItem, ...]
    accept_failure: bool = False


@dataclass(frozen=True)
class CanaryAnswer:
    id: str
    kind: str
    expected: str
    got: str
    p_got: float | None  # the judge's probability of its label (None: the rule decided)
    raw: str | None

    @property
    def ok(self) -> bool:
        return self.got == self.expected


@dataclass(frozen=True)
class CanaryResult:
    answers: tuple[CanaryAnswer, ...]
    allowed: int  # misses the rule allows

    @property
    def misses(self) -> int:
        return sum(not a.ok for a in self.answers)

    @property
    def labels_given(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.answers:
            counts[a.got] = counts.get(a.got, 0) + 1
        return counts

    @property
    def constant(self) -> bool:
        return len(self.labels_given) < 2

    @property
    def passed(self) -> bool:
        return self.misses <= self.allowed and not self.constant

    def summary(self) -> str:
        """One line: the verdict of the canary and every answer (what the judge said)."""
        n = len(self.answers)
        given = ", ".join(f"{lb} x{k}" for lb, k in self.labels_given.items())
        head = (
            f"judge canary {'passed' if self.passed else 'failed'}: {n - self.misses} of {n} "
            f"anchors right (at most {self.allowed} miss{'es' if self.allowed != 1 else ''} "
            f"allowed), labels given: {given}"
            + ("; ONE LABEL FOR EVERY ANCHOR" if self.constant else "")
        )
        each = "; ".join(
            f"{a.id}: {a.expected} -> {a.got}"
            + ("" if a.p_got is None else f" (P {a.p_got:.2f})")
            + ("" if a.ok else " MISS")
            for a in self.answers
        )
        return f"{head}. Answers: {each}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "anchors": len(self.answers),
            "misses": self.misses,
            "allowed_misses": self.allowed,
            "labels_given": self.labels_given,
            "one_label": self.constant,
            "answers": [asdict(a) for a in self.answers],
        }


def grade(anchors: Sequence[Anchor], verdicts: Sequence[dict[str, Any]]) -> CanaryResult:
    """The canary's result from the judge's verdict rows on the anchors (keyed anchor:<id>)."""
    by_key = {v["row_key"]: v for v in verdicts}
    answers = []
    for a in anchors:
        v = by_key.get(a.row_key)
        if v is None:
            raise AnchorError(f"the judge returned no verdict for anchor {a.id}")
        probs = dict(v.get("probs") or ())
        answers.append(
            CanaryAnswer(a.id, a.kind, a.label, v["label"], probs.get(v["label"]), v.get("raw"))
        )
    return CanaryResult(tuple(answers), allowed_misses(len(anchors)))
