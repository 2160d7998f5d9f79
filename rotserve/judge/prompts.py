"""The judge's input for one row: the rubric rendered, tokenized, and fitted to its context.

Pure given a tokenizer (any HF tokenizer: apply_chat_template, __call__, decode).

The context rule (stated in every verdict manifest): a judge prompt plus the longest answer
must fit the judge's context (max_model_len). When it does not, the GENERATION is cut: only
its first tokens are kept (the judge tokenizer's tokens, as many as fit), because how a reply
starts is what tells a refusal from an answer; the verdict row says `truncated = true` and
the manifest counts them. If even an empty generation does not fit (the instruction or the
rubric alone is too long), that is an error before any engine starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rotserve.judge.rubrics import Rubric

TRUNCATION_RULE = (
    "when prompt + longest label does not fit the judge's context, the generation is cut to "
    "its first tokens (as many as fit) and the verdict is marked truncated"
)


class ContextError(ValueError):
    """A row whose judge prompt cannot fit the judge's context even with no generation."""


@dataclass(frozen=True)
class JudgeInput:
    token_ids: tuple[int, ...]
    truncated: bool


def render(rubric: Rubric, tokenizer: Any, instruction: str, generation: str) -> str:
    """The judge prompt as text: the chat template applied where the rubric asks for it."""
    if rubric.conversation:
        messages = [
            {"role": "user", "content": instruction},
            {"role": "assistant", "content": generation},
        ]
        return _chat(tokenizer, messages)
    text = rubric.fill(instruction, generation)
    if rubric.chat:
        return _chat(tokenizer, [{"role": "user", "content": text}])
    return text


def _chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ContextError(
            "the judge's tokenizer has no chat template, but the rubric sends a chat; use a "
            "chat model as judge, or a rubric file with chat = false"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(rubric: Rubric, tokenizer: Any, text: str) -> list[int]:
    # A rendered chat template already holds its BOS (if the model has one); a raw prompt
    # (chat = false, HarmBench's) gets the tokenizer's special tokens, as its authors run it.
    chat = rubric.chat or rubric.conversation
    return list(tokenizer(text, add_special_tokens=not chat, verbose=False)["input_ids"])


def answer_budget(labels: tuple[str, ...]) -> int:
    """max_tokens for a guided choice: every token holds at least one byte, plus the EOS."""
    return max(len(lb.encode("utf-8")) for lb in labels) + 1


def judge_input(
    rubric: Rubric, tokenizer: Any, instruction: str, generation: str, context: int
) -> JudgeInput:
    """Token ids of the judge prompt for one row, fitted to `context` by TRUNCATION_RULE."""
    room = context - answer_budget(rubric.labels)
    ids = encode(rubric, tokenizer, render(rubric, tokenizer, instruction, generation))
    if len(ids) <= room:
        return JudgeInput(tuple(ids), False)
    gen_ids = tokenizer(generation, add_special_tokens=False, verbose=False)["input_ids"]
    empty = encode(rubric, tokenizer, render(rubric, tokenizer, instruction, ""))
    if len(empty) > room:
        raise ContextError(
            f"the judge prompt is {len(empty)} tokens with an EMPTY generation, more than the "
            f"judge's context of {context} minus {context - room} for the answer: the "
            "instruction (or the rubric) is too long for this judge; use a judge with a longer "
            "context (--max-model-len) or a shorter rubric"
        )
    # Binary search the longest generation prefix (in judge tokens) that fits.
    lo, hi, best = 0, len(gen_ids), empty
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cut = tokenizer.decode(gen_ids[:mid], skip_special_tokens=True)
        cand = encode(rubric, tokenizer, render(rubric, tokenizer, instruction, cut))
        if len(cand) <= room:
            lo, best = mid, cand
        else:
            hi = mid - 1
    return JudgeInput(tuple(best), True)


def short_by_rule(rubric: Rubric, generation: str) -> bool:
    """Does the rubric's short-response rule decide this generation?"""
    return rubric.min_words is not None and len(generation.split()) < rubric.min_words
