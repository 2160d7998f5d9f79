"""Toy models and data: a local chat tokenizer, random tiny models, synthetic chats, and the
trained toy refusal model (data/toy-refusal/) that demonstrates steering without downloads."""

from pathlib import Path

from rotserve.toy.synthetic import Example, corpus_texts, generate, split_of, train_heldout_split
from rotserve.toy.tiny import make_config, make_tiny_model, prompt_texts, toy_tokenizer
from rotserve.toy.tokenizer import CHAT_TEMPLATE, EOS_ID, IM_START_ID, PAD_ID, build_tokenizer

TOY_REFUSAL_DIR = Path(__file__).resolve().parents[2] / "data" / "toy-refusal"

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_ID",
    "IM_START_ID",
    "PAD_ID",
    "TOY_REFUSAL_DIR",
    "Example",
    "build_tokenizer",
    "corpus_texts",
    "generate",
    "make_config",
    "make_tiny_model",
    "prompt_texts",
    "split_of",
    "toy_tokenizer",
    "train_heldout_split",
]
