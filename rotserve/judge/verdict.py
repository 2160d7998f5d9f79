"""From the judge's answer to a verdict: the label (rubric.read), the probability of each label
from the judge's log-probs, and the constraint a choice rubric decodes under. Pure.

The probability of a label is read at the DECISION POSITION: the first generated token that is
not whitespace (a Llama Guard judge says `\\n\\n` before `unsafe`; that token decides nothing),
or the single token of a `one_token` reading. There, each of the top TOP_LOGPROBS tokens is
given to the label it spells:

- `one_token`: a token whose stripped, lowercased text equals the label's (`▁Yes`, `Yes`, ` yes`
  all count for `Yes`), the same test the official reading applies to the one token;
- `first_line` and `choice`: a token whose text, whitespace dropped and lowercased, starts
  exactly one label (`un` and `unsafe` count for `unsafe`). A token that starts several labels
  (`re` of `redirect` and `refusal`) is followed one position further when it is the token the
  judge took: its probability times the next position's split (the chain rule); when it is not,
  vLLM gives no log-probs after it and its mass counts for no label.

So a label's probability is the judge's, summed over its natural token variants, and a lower
bound when a variant falls outside the top TOP_LOGPROBS or behind an untaken shared prefix. It is
not renormalised: P(yes) + P(no) < 1 says how much mass went elsewhere. Under a choice
constraint vLLM returns the log-probs of the constrained distribution (the grammar's mask is
applied before they are computed), so a choice rubric's probabilities are over the labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rotserve.judge.rubrics import CHOICE_WHITESPACE, Rubric

TOP_LOGPROBS = 20  # log-probs per generated token: vLLM's default cap (max_logprobs)


@dataclass(frozen=True)
class Step:
    """One generated position: the token the judge took and the top tokens' probabilities."""

    token_id: int
    top: tuple[tuple[int, str, float], ...]  # (token id, text, probability), the taken one too


@dataclass(frozen=True)
class Answer:
    """What the judge engine returns for one prompt."""

    text: str
    finish: str | None
    steps: tuple[Step, ...]


def answer_of(output: Any) -> Answer:
    """An Answer from a vLLM CompletionOutput (token_ids, logprobs, text, finish_reason)."""
    steps = []
    # one log-probs dict per generated token (vLLM always includes the token it took)
    ranked_per_token = output.logprobs if output.logprobs is not None else []
    for token_id, ranked in zip(output.token_ids, ranked_per_token, strict=False):
        top = tuple(
            (int(tid), lp.decoded_token or "", math.exp(lp.logprob)) for tid, lp in ranked.items()
        )
        steps.append(Step(int(token_id), top))
    return Answer(output.text, output.finish_reason, tuple(steps))


def _norm(text: str) -> str:
    return "".join(text.split()).lower()


def label_probs(rubric: Rubric, steps: tuple[Step, ...]) -> dict[str, float]:
    """P(label) for every label of the rubric, by the rule in the module docstring."""
    probs = dict.fromkeys(rubric.labels, 0.0)
    if not steps:
        return probs
    if rubric.reading == "one_token":
        want = {lb.lower(): lb for lb in rubric.labels}
        for _, text, p in steps[0].top:
            lb = want.get(text.strip().lower())
            if lb is not None:
                probs[lb] += p
        return probs
    targets = {lb: _norm(lb) for lb in rubric.labels}
    prefix, mass = "", 1.0
    for step in steps:
        taken = next((p for tid, _, p in step.top if tid == step.token_id), None)
        taken_text = next((t for tid, t, _ in step.top if tid == step.token_id), "")
        if not prefix and not _norm(taken_text):
            continue  # whitespace before the verdict: not the decision position
        follow = None
        for tid, text, p in step.top:
            cand = prefix + _norm(text)
            if not cand or cand == prefix:
                continue  # adds nothing to the label's text
            starts = [lb for lb, t in targets.items() if t.startswith(cand)]
            if len(starts) == 1:
                probs[starts[0]] += mass * p
            elif len(starts) > 1 and tid == step.token_id:
                follow = cand
        if follow is None or taken is None:
            break
        prefix, mass = follow, mass * taken
    return probs


def choice_regex(labels: tuple[str, ...]) -> str:
    """The constraint of a choice rubric: up to CHOICE_WHITESPACE whitespace characters, then one
    label. vLLM's own `choice` is a grammar of the bare labels, which bans a judge's natural
    first token when it carries a space (SentencePiece `▁Yes`, byte-level `Ġdirect`) or is
    `\\n\\n`: the verdict would be read from tokens the judge does not emit there."""
    alts = "|".join(_regex_escape(lb) for lb in labels)
    return f"[ \\t\\r\\n]{{0,{CHOICE_WHITESPACE}}}({alts})"


def _regex_escape(text: str) -> str:
    # Escape only regex syntax: xgrammar warns on Python re.escape's escaped spaces.
    return "".join("\\" + c if c in r"\^$.|?*+()[]{}/" else c for c in text)
