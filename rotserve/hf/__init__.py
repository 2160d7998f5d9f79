"""Hugging Face transformers side of rotserve: model sites and the hook-based reference generator."""

from rotserve.hf.generate import HFGeneration, HFRotatedGenerator, RotationHooks, load_hf_model
from rotserve.hf.sites import decoder_layers

__all__ = [
    "HFGeneration",
    "HFRotatedGenerator",
    "RotationHooks",
    "decoder_layers",
    "load_hf_model",
]
