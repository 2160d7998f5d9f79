"""The judge's input for one row: the rubric rendered, tokenized, and fitted to its context.

Pure given a tokenizer (any HF tokenizer: apply_chat_template, __call__, encode, decode).

Before any row, `prompt_shape` renders the rubric for a sentinel row and checks that the
sentinel instruction and generation are in the judge's prompt: a chat template that drops the
conversation (Llama Guard 3 1B's renders only typed content parts,
`[{"type": "text", "text": ...}]`, and prints nothing for a plain string) would otherwise give
every row the same empty prompt. The content shape the template renders (plain strings, else
typed parts) is found by rendering, not by the model's name, and used for every row.

The clip (a rubric's `clip_tokens`, HarmBench's 512) cuts every generation to its first judge
tokens as the official pipeline does, before the prompt is filled.

The context rule (stated in every verdict manifest): a judge prompt plus the answer's token
budget must fit the judge's context (max_model_len). When it does not, the GENERATION is cut:
only its first tokens are kept (the judge tokenizer's tokens, as many as fit), because how a
reply starts is what tells a refusal from an answer; the verdict row says `truncated = true`
and the manifest counts them. If even an empty generation does not fit (the instruction or the
rubric alone is too long), that is an error before any engine starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rotserve.judge.rubrics import INSTRUCTION, Rubric
from rotserve.scoring import word_count

TRUNCATION_RULE = (
    "when prompt + the answer's token budget does not fit the judge's context, the generation "
    "is cut to its first tokens (as many as fit) and the verdict is marked truncated"
)
SHAPES = ("string", "parts")  # a chat message's content: a plain string, or typed text parts
# Sentinel row: strings no real row holds, to see whether the judge's prompt shows the row.
SENTINEL_INSTRUCTION = "ROTSERVE-SENTINEL-INSTRUCTION-3f9c2b"
SENTINEL_GENERATION = "ROTSERVE-SENTINEL-GENERATION-7d41ae"


class ContextError(ValueError):
    """A row whose judge prompt cannot fit the judge's context even with no generation."""


class PromptShapeError(ValueError):
    """A judge whose prompt cannot show the row (its chat template drops the conversation)."""


@dataclass(frozen=True)
class JudgeInput:
    token_ids: tuple[int, ...]
    truncated: bool
    clipped: bool = False  # the rubric's clip cut the generation


def _content(text: str, shape: str) -> str | list[dict[str, str]]:
    return text if shape == "string" else [{"type": "text", "text": text}]


def render(
    rubric: Rubric, tokenizer: Any, instruction: str, generation: str, shape: str = "string"
) -> str:
    """The judge prompt as text: the chat template applied where the rubric asks for it, with
    message contents in `shape` (prompt_shape finds the one the template renders)."""
    if rubric.conversation:
        messages = [
            {"role": "user", "content": _content(instruction, shape)},
            {"role": "assistant", "content": _content(generation, shape)},
        ]
        return _chat(tokenizer, messages)
    text = rubric.fill(instruction, generation)
    if rubric.chat:
        return _chat(tokenizer, [{"role": "user", "content": _content(text, shape)}])
    return text


def _chat(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptShapeError(
            "the judge's tokenizer has no chat template, but the rubric sends a chat; use a "
            "chat model as judge, or a rubric file with chat = false"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_shape(rubric: Rubric, tokenizer: Any) -> str:
    """The content shape ("string" or "parts") whose judge prompt shows the row, found by
    rendering a sentinel row; PromptShapeError naming the rubric and the template if none does.

    Shown means: the sentinel generation is in the prompt, and the sentinel instruction too
    wherever the rubric has one (a conversation's user turn, or `{instruction}` in a template).
    """
    wants_instruction = rubric.conversation or INSTRUCTION in (rubric.template or "")
    uses_chat = rubric.conversation or rubric.chat
    tried = []
    for shape in SHAPES if uses_chat else SHAPES[:1]:
        try:
            text = render(rubric, tokenizer, SENTINEL_INSTRUCTION, SENTINEL_GENERATION, shape)
        except PromptShapeError:
            raise
        except Exception as e:  # a template that cannot take this shape (Jinja errors)
            tried.append(f"{shape} contents: {type(e).__name__}: {e}")
            continue
        missing = [
            what
            for what, sentinel, needed in (
                ("generation", SENTINEL_GENERATION, True),
                ("instruction", SENTINEL_INSTRUCTION, wants_instruction),
            )
            if needed and sentinel not in text
        ]
        if not missing:
            return shape
        tried.append(f"{shape} contents: the prompt lacks the row's {' and '.join(missing)}")
    template = (
        "the judge's chat template"
        if rubric.conversation
        else "its template" + (" inside the judge's chat template" if rubric.chat else "")
    )
    raise PromptShapeError(
        f"rubric {rubric.name!r}: {template} does not show the row to the judge ("
        + "; ".join(tried)
        + "): every row would get the same prompt. Use a judge whose chat template renders the "
        "conversation, or a rubric whose template holds {generation}"
    )


def encode(rubric: Rubric, tokenizer: Any, text: str) -> list[int]:
    # A rendered chat template already holds its BOS (if the model has one); a raw prompt
    # (chat = false, HarmBench's) gets the tokenizer's special tokens, as its authors run it.
    chat = rubric.chat or rubric.conversation
    return list(tokenizer(text, add_special_tokens=not chat, verbose=False)["input_ids"])


def clip(rubric: Rubric, tokenizer: Any, generation: str) -> tuple[str, bool]:
    """(generation as the judge sees it, whether the clip cut it): HarmBench's
    `tokenizer.encode(g, max_length=N, truncation=True)` then `decode(skip_special_tokens=True)`,
    right-side truncation, applied to every generation as its pipeline does (so a short one
    makes the same round trip). Unchanged when the rubric has no clip."""
    n = rubric.clip_tokens
    if n is None:
        return generation, False
    side = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = "right"  # HarmBench sets it so
    try:
        ids = tokenizer.encode(generation, max_length=n, truncation=True)
        whole = tokenizer.encode(generation)
    finally:
        tokenizer.truncation_side = side
    return tokenizer.decode(ids, skip_special_tokens=True), len(whole) > len(ids)


def judge_input(
    rubric: Rubric,
    tokenizer: Any,
    instruction: str,
    generation: str,
    context: int,
    shape: str = "string",
) -> JudgeInput:
    """Token ids of the judge prompt for one row: clipped by the rubric, fitted to `context` by
    TRUNCATION_RULE, message contents in `shape`."""
    generation, clipped = clip(rubric, tokenizer, generation)
    room = context - rubric.max_tokens

    def ids_of(gen: str) -> list[int]:
        return encode(rubric, tokenizer, render(rubric, tokenizer, instruction, gen, shape))

    ids = ids_of(generation)
    if len(ids) <= room:
        return JudgeInput(tuple(ids), False, clipped)
    gen_ids = tokenizer(generation, add_special_tokens=False, verbose=False)["input_ids"]
    empty = ids_of("")
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
        cand = ids_of(tokenizer.decode(gen_ids[:mid], skip_special_tokens=True))
        if len(cand) <= room:
            lo, best = mid, cand
        else:
            hi = mid - 1
    return JudgeInput(tuple(best), True, clipped)


def short_by_rule(rubric: Rubric, generation: str) -> bool:
    """Does the rubric's short-response rule decide this generation? Words are counted as the
    reference evaluation counts them (rotserve.scoring.word_count, `split(" ")`)."""
    return rubric.min_words is not None and word_count(generation) < rubric.min_words
