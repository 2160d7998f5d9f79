"""The toy refusal model's tokenizer: a byte-level BPE with a Qwen-style chat template, trained
locally over the shipped prompts plus the synthetic corpus.

Why: toy models must be built without downloads, and the whole pipeline (chat template, left
padding, stop token, substring scoring of decoded text) must behave like a real chat model's.
Byte-level BPE decodes every byte sequence back exactly, so "I can't" survives decode and the
refusal scorer sees what the model produced.

Token ids: <|endoftext|> = 0 (pad), <|im_start|> = 1, <|im_end|> = 2 (eos: a chat turn ends there),
then the 256 byte symbols, then merges. The trained files ship in data/toy-refusal/, and
rotserve.tiny_model copies them into every tiny model, so the ids are defined there once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from rotserve.paths import default_prompts
from rotserve.tiny_model import EOS_ID, IM_START_ID, PAD_ID, TOY_VOCAB_SIZE
from tools.toy_refusal.synthetic import corpus_texts

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# The pre-tokenizer split of Qwen2 (a public constant of its tokenizer), reproduced so the trained
# BPE survives transformers' Qwen2Tokenizer reconstruction unchanged.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# One turn per message, no default system prompt; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = TOY_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE on texts and wrap it as a chat tokenizer.

    Same texts (same order) and vocab_size give the same vocabulary and merges. The result pads
    on the left (batched generation reads position -1 as the last prompt token), uses
    <|endoftext|> as pad and <|im_end|> as eos, and carries CHAT_TEMPLATE.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256}")
    tok = Tokenizer(models.BPE())
    # Exactly Qwen2's pipeline: transformers 5 rebuilds it for any model_type "qwen2" checkpoint
    # whatever tokenizer.json says, so training on anything else would tokenize differently
    # from what HF and vLLM see at inference (digits, "step-by-step" split differently).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained `tokenizers` BPE as the HF chat tokenizer (specials, padding, template)."""
    for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, IM_START_ID, EOS_ID), strict=True):
        assert tok.token_to_id(token) == expected, (token, tok.token_to_id(token))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def prompt_texts() -> list[str]:
    """Instructions of the shipped harmful/harmless prompt sets, in file order ([] if absent)."""
    texts: list[str] = []
    for path in default_prompts().values():
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    texts.append(json.loads(line)["instruction"])
    return texts


@lru_cache(maxsize=4)
def _toy_bpe_json(vocab_size: int) -> str:
    return build_tokenizer(prompt_texts() + corpus_texts(), vocab_size).backend_tokenizer.to_str()


def toy_tokenizer(vocab_size: int = TOY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The toy tokenizer, trained now: BPE over the shipped prompts plus the synthetic corpus.

    Deterministic (it must equal data/toy-refusal/tokenizer.json unless the word lists or the
    prompt sets changed); the trained BPE is cached per process.
    """
    return wrap_tokenizer(Tokenizer.from_str(_toy_bpe_json(vocab_size)))
