"""Hugging Face transformers side of rotserve: model sites and the hook-based reference generator."""

from rotserve.hf.generate import HFGeneration, HFRotatedGenerator, RotationHooks, load_hf_model
from rotserve.hf.sites import UnsupportedArchitectureError, decoder_layers, parse_layers

__all__ = [
    "HFGeneration",
    "HFRotatedGenerator",
    "RotationHooks",
    "UnsupportedArchitectureError",
    "decoder_layers",
    "load_hf_model",
    "parse_layers",
]
