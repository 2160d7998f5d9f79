"""Procedurally generated chats that teach a tiny model to refuse harmful-type requests.

Why synthetic: the toy model must be trainable here (no downloads, no public datasets shipped),
deterministic, and carry refusal as a clean feature. So instructions are built from the word
lists in wordlists.json (beside this file; one list per key, notes under "_about"):

    instruction = template(task)      task = verb + object + suffix   (or a topic / a request)

Both classes share every template ("Explain how to ...", "Can you ...?"), so the only thing that
separates them is the content words. Harmful-type instructions are answered with a refusal that
STARTS with a marker of the substring refusal scorer (rotserve.scoring: a reply is a refusal
when it contains one of its markers, case-insensitively), harmless ones with a short, plausible
helpful answer that contains no marker (checked when the answer is made).

Split: every instruction has a "core" (kind, category, verb, object) or (kind, category, topic).
A stable hash of the core puts it in "train" or "heldout", so a held-out instruction never appears
in training in any template or with any suffix: the held-out set measures generalisation to unseen
verb-object pairs. The hand-written sets in data/prompts/ are excluded from training verbatim;
the word lists were written to cover their vocabulary, so they test new phrasings of known topics.

The prompts are only prompts: they name harms, they never contain how to do them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotserve.scoring import refusal_marker

HARMFUL, HARMLESS = "harmful", "harmless"
WORDLISTS = Path(__file__).resolve().with_name("wordlists.json")


def _w(words: str) -> tuple[str, ...]:
    """'a; b; c' -> ('a', 'b', 'c'): keeps short word lists compact and easy to read."""
    return tuple(w.strip() for w in words.split(";"))


def _tuples(value: Any) -> Any:
    """JSON lists -> tuples (dicts kept, in file order): the lists are constants."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _groups(tasks: dict[str, list[dict[str, list[str]]]]) -> dict[str, tuple[Group, ...]]:
    """{category: [{verbs, objects}, ...]} -> {category: ((verbs, objects), ...)}."""
    return {
        cat: tuple((tuple(g["verbs"]), tuple(g["objects"])) for g in groups)
        for cat, groups in tasks.items()
    }


Group = tuple[tuple[str, ...], tuple[str, ...]]
_LISTS: dict[str, Any] = json.loads(WORDLISTS.read_text(encoding="utf-8"))

# Templates, shared by both classes (placeholders: see "_about" in wordlists.json).
TASK_TEMPLATES: tuple[str, ...] = _tuples(_LISTS["task_templates"])
REQUEST_TEMPLATES: tuple[str, ...] = _tuples(_LISTS["request_templates"])
TOPIC_TEMPLATES: tuple[str, ...] = _tuples(_LISTS["topic_templates"])

# Harmful-type content: category -> ((verbs, objects), ...), suffixes, topics.
HARMFUL_TASKS: dict[str, tuple[Group, ...]] = _groups(_LISTS["harmful_tasks"])
HARMFUL_SUFFIXES: dict[str, tuple[str, ...]] = _tuples(_LISTS["harmful_suffixes"])
HARMFUL_TOPICS: dict[str, tuple[str, ...]] = _tuples(_LISTS["harmful_topics"])

# Everyday things (an unfamiliar but benign request defaults to a helpful answer), then the
# harmless content, whose verbs partly overlap the harmful ones on purpose.
GENERAL_NOUNS: tuple[str, ...] = _tuples(_LISTS["general_nouns"])
GENERAL_VERBS: tuple[str, ...] = _tuples(_LISTS["general_verbs"])
HARMLESS_TASKS: dict[str, tuple[Group, ...]] = _groups(_LISTS["harmless_tasks"])
HARMLESS_SUFFIXES: dict[str, tuple[str, ...]] = _tuples(_LISTS["harmless_suffixes"])
HARMLESS_REQUESTS: dict[str, tuple[str, ...]] = _tuples(_LISTS["harmless_requests"])
HARMLESS_TOPICS: dict[str, tuple[str, ...]] = {
    **_tuples(_LISTS["harmless_topics"]),
    "general": tuple(
        f"{kind} {noun}" for noun in GENERAL_NOUNS for kind in ("the history of", "fun facts about")
    ),
}

# Answers. Refusal openers start with a scorer marker; helpful answers must contain none.
REFUSAL_OPENERS: tuple[str, ...] = _tuples(_LISTS["refusal_openers"])
REFUSAL_REASONS: tuple[str, ...] = _tuples(_LISTS["refusal_reasons"])
REFUSAL_TOPICS: dict[str, str] = _LISTS["refusal_topics"]
REFUSAL_OFFERS: dict[str, str] = _LISTS["refusal_offers"]
HELPFUL_OPENERS: tuple[str, ...] = _tuples(_LISTS["helpful_openers"])
HELPFUL_STEPS: dict[str, tuple[str, ...]] = _tuples(_LISTS["helpful_steps"])
HELPFUL_FACTS: dict[str, tuple[str, ...]] = _tuples(_LISTS["helpful_facts"])
WRITING_LINES: tuple[str, ...] = _tuples(_LISTS["writing_lines"])

# Made-up words teach the default: a request whose words the model has never seen is answered.
# Without them a tiny model refuses unfamiliar harmless requests (measured: ~8% of held-out ones).
NOVEL_VERBS: tuple[str, ...] = _tuples(_LISTS["novel_verbs"])


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One synthetic chat: a user instruction and the assistant's reply."""

    instruction: str
    response: str
    label: str  # "harmful" | "harmless"
    category: str
    core: str  # the unit of the train/held-out split


_DOUBLE = {
    "rob",
    "plan",
    "stop",
    "run",
    "get",
    "set",
    "put",
    "cut",
    "shop",
    "dig",
    "stab",
    "trap",
    "kidnap",
    "dox",
    "swim",
    "shoot",
}
_IRREGULAR = {
    "dox": "doxxing",
    "kidnap": "kidnapping",
    "lie": "lying",
    "shoot": "shooting",
    "see": "seeing",
    "free": "freeing",
}


def gerund(phrase: str) -> str:
    """'build a birdhouse' -> 'building a birdhouse' (only the first word changes)."""
    first, _, rest = phrase.partition(" ")
    if first in _IRREGULAR:
        ing = _IRREGULAR[first]
    elif first in _DOUBLE:
        ing = first + first[-1] + "ing"
    elif first.endswith("ie"):
        ing = first[:-2] + "ying"
    elif first.endswith("e") and not first.endswith("ee"):
        ing = first[:-1] + "ing"
    else:
        ing = first + "ing"
    return f"{ing} {rest}" if rest else ing


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def split_of(core: str, heldout_frac: float = 0.15) -> str:
    """'train' or 'heldout' from a stable hash of the core (independent of seed and order)."""
    h = int.from_bytes(hashlib.sha256(core.encode()).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_frac else "train"


def _pick_task(
    rng: random.Random, tasks: dict[str, tuple[Group, ...]], suffixes: dict[str, tuple[str, ...]]
) -> tuple[str, str, str]:
    category = rng.choice(sorted(tasks))
    verbs, objects = rng.choice(tasks[category])
    verb, obj = rng.choice(verbs), rng.choice(objects)
    suffix = rng.choice(suffixes[category])
    task = f"{verb} {obj} {suffix}" if suffix else f"{verb} {obj}"
    return category, task, f"task|{category}|{verb}|{obj}"


def _instruction_from_task(rng: random.Random, task: str) -> str:
    if rng.random() < 0.2:
        tpl = rng.choice(REQUEST_TEMPLATES)
    else:
        tpl = rng.choice(TASK_TEMPLATES)
    return tpl.format(t=task, T=_cap(task), g=gerund(task), r=task, R=_cap(task))


def refusal(rng: random.Random, category: str) -> str:
    """A refusal that starts with a scorer marker, then a reason and a safer offer."""
    opener = rng.choice(REFUSAL_OPENERS).format(topic=REFUSAL_TOPICS[category])
    parts = [opener, rng.choice(REFUSAL_REASONS)]
    if rng.random() < 0.7:
        parts.append(REFUSAL_OFFERS[category])
    return " ".join(parts)


def helpful(rng: random.Random, category: str, task: str | None = None, kind: str = "task") -> str:
    """A short helpful answer with no refusal marker: steps, a draft, or a few facts."""
    opener = rng.choice(HELPFUL_OPENERS)
    if kind == "topic":
        facts = rng.sample(HELPFUL_FACTS[category], 3)
        text = f"{opener} {' '.join(facts)}"
    elif category == "writing" and task is not None and rng.random() < 0.6:
        lines = rng.sample(WRITING_LINES, 2)
        text = (
            f"{opener} Here is a short draft. {lines[0]} {lines[1]} "
            "Let me know if you want a different tone."
        )
    else:
        s1, s2, s3 = rng.sample(HELPFUL_STEPS[category], 3)
        form = rng.randrange(3)
        if form == 0 and task is not None:
            text = (
                f"{opener} Here is a simple way to {task}. First, {s1}. Next, {s2}. Finally, {s3}."
            )
        elif form == 1 and task is not None:
            text = f"{opener} To {task}, {s1}. Then {s2}, and {s3}."
        else:
            text = f"{opener} Here are three tips. 1. {_cap(s1)}. 2. {_cap(s2)}. 3. {_cap(s3)}."
    assert refusal_marker(text) is None, text  # a helpful answer must never score as refusal
    return text


# Pieces of made-up words (pseudo_word), and stems they must never contain.
_ONSETS = _w("b; d; f; g; l; m; n; p; r; s; t; v; z; br; fl; gr; pl; st; tr")
_VOWELS = _w("a; e; i; o; u; ai; ee; oo")
_CODAS = ("", "n", "r", "l", "s", "x")
_AVOID = ("bom", "gun", "kil", "hak", "met", "drug", "stea", "rob", "pois", "ter", "sui")


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word ('flooteen'), never containing a harmful-looking stem."""
    while True:
        n = rng.randint(2, 3)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n))
        word += rng.choice(_CODAS)
        if not any(stem in word for stem in _AVOID):
            return word


def novel_example(rng: random.Random) -> Example:
    """A harmless request about made-up things, answered helpfully (training only)."""
    noun = pseudo_word(rng) if rng.random() < 0.6 else f"{pseudo_word(rng)} {pseudo_word(rng)}"
    article = "an" if noun[0] in "aeiou" else "a"
    if rng.random() < 0.8:
        suffix = rng.choice(HARMLESS_SUFFIXES["general"])
        task = f"{rng.choice(NOVEL_VERBS)} {article} {noun}" + (f" {suffix}" if suffix else "")
        instruction = _instruction_from_task(rng, task)
        response = helpful(rng, "general", None)  # no copying of made-up words into the reply
    else:
        topic = rng.choice((f"how {article} {noun} works", f"the history of the {noun}"))
        instruction = rng.choice(TOPIC_TEMPLATES).format(c=topic)
        response = helpful(rng, "general", None, kind="topic")
    return Example(instruction, response, HARMLESS, "novel", f"novel|{noun}")


def sample_example(rng: random.Random, label: str, novel: float = 0.0) -> Example:
    """Draw one chat of the given label (not yet filtered by split).

    novel: the share of harmless chats about made-up words (see novel_example).
    """
    if label == HARMLESS and novel and rng.random() < novel:
        return novel_example(rng)
    r = rng.random()
    if label == HARMFUL:
        if r < 0.85:
            category, task, core = _pick_task(rng, HARMFUL_TASKS, HARMFUL_SUFFIXES)
            instruction = _instruction_from_task(rng, task)
        else:
            category = rng.choice(sorted(HARMFUL_TOPICS))
            topic = rng.choice(HARMFUL_TOPICS[category])
            core = f"topic|{category}|{topic}"
            instruction = rng.choice(TOPIC_TEMPLATES).format(c=topic)
        return Example(instruction, refusal(rng, category), HARMFUL, category, core)
    if r < 0.75:
        category, task, core = _pick_task(rng, HARMLESS_TASKS, HARMLESS_SUFFIXES)
        instruction = _instruction_from_task(rng, task)
        response = helpful(rng, category, task)
    elif r < 0.85:
        category = rng.choice(sorted(HARMLESS_REQUESTS))
        request = rng.choice(HARMLESS_REQUESTS[category])
        core = f"request|{category}|{request}"
        instruction = rng.choice(REQUEST_TEMPLATES).format(r=request, R=_cap(request))
        response = helpful(rng, category, None)
    else:
        category = rng.choice(sorted(HARMLESS_TOPICS))
        topic = rng.choice(HARMLESS_TOPICS[category])
        core = f"topic|{category}|{topic}"
        instruction = rng.choice(TOPIC_TEMPLATES).format(c=topic)
        response = helpful(rng, category, None, kind="topic")
    return Example(instruction, response, HARMLESS, category, core)


def _norm(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".?!").split())


def generate(
    n_per_label: int,
    split: str = "train",
    seed: int = 0,
    exclude: Iterable[str] = (),
    heldout_frac: float = 0.15,
    n_harmless: int | None = None,
    novel: float = 0.0,
) -> list[Example]:
    """n_per_label harmful + n_harmless (default n_per_label) chats from one side of the split.

    Deterministic in its arguments. novel: share of harmless chats about made-up words. Instructions are unique within the result and
    any instruction in `exclude` (compared case- and punctuation-insensitively) is skipped, so the
    hand-written data/prompts sets can be kept out of training.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"rotserve-toy-{split}-{seed}")
    banned = {_norm(t) for t in exclude}
    seen: set[str] = set()
    out: list[Example] = []
    wanted = {HARMFUL: n_per_label, HARMLESS: n_per_label if n_harmless is None else n_harmless}
    for label, n in wanted.items():
        count, tries = 0, 0
        while count < n:
            tries += 1
            if tries > 200 * n + 10_000:
                raise RuntimeError(f"could not draw {n} unique {label} {split} examples")
            ex = sample_example(rng, label, novel)
            key = _norm(ex.instruction)
            if split_of(ex.core, heldout_frac) != split or key in seen or key in banned:
                continue
            seen.add(key)
            out.append(ex)
            count += 1
    rng.shuffle(out)
    return out


def train_heldout_split(
    n_train: int,
    n_heldout: int,
    seed: int = 0,
    exclude: Sequence[str] = (),
    harmless_ratio: float = 1.0,
    novel: float = 0.0,
) -> tuple[list[Example], list[Example]]:
    """(train, heldout): their cores and instructions never overlap.

    n_train harmful and round(n_train * harmless_ratio) harmless training chats, of which a
    share `novel` is about made-up words; the held-out set is balanced (n_heldout per label) and
    has no made-up words. A ratio above 1 and novel chats tilt the model's default toward
    answering, so that refusing needs evidence in the request.
    """
    n_harmless = round(n_train * harmless_ratio)
    train = generate(n_train, "train", seed, exclude, n_harmless=n_harmless, novel=novel)
    heldout = generate(n_heldout, "heldout", seed, exclude)
    return train, heldout


def corpus_texts(n: int = 1500, seed: int = 0) -> list[str]:
    """Plain texts (instructions and replies) for training the toy tokenizer; deterministic."""
    rng = random.Random(f"rotserve-toy-corpus-{seed}")
    texts = []
    for i in range(n):
        ex = sample_example(rng, HARMFUL if i % 2 == 0 else HARMLESS)
        texts += [ex.instruction, ex.response]
    return texts
