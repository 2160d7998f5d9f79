"""`rotserve convert-gguf FILE OUT`: a GGUF checkpoint as an ordinary HF model directory.

Many users hold models as GGUF files (llama.cpp, Ollama). rotserve's extraction, its HF oracle
and vLLM's rotated architectures all read HF directories, so this writes one: transformers
dequantises the GGUF tensors (with the `gguf` package), and the weights are saved as
safetensors in the dtype asked for, with the config (its quantisation entry removed: the
weights are plain floats now), the tokenizer and its chat template.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rotserve.cli import DefaultsFormatter

DTYPES = ("float32", "bfloat16", "float16")


class ConvertError(ValueError):
    """A GGUF file that cannot be converted; the message says why and what to do."""


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Dequantise `gguf_file` into the HF model directory `out_dir`; returns out_dir."""
    import torch

    src, out = Path(gguf_file).expanduser().resolve(), Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not src.is_file() or src.suffix != ".gguf":
        raise ConvertError(f"{gguf_file}: not a .gguf file")
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out} exists and is not empty: choose an empty or new folder")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConvertError(
            "reading GGUF needs the gguf package: pip install 'rotserve[gguf]'"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": src.name, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(src.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src.parent, dtype=getattr(torch, dtype), **kwargs)
    # The tensors are dequantised in memory; what would stop save_pretrained is only the
    # record that they came from a quantised file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Dequantise a GGUF model file into an HF model directory (safetensors, "
        "config, tokenizer, chat template) that every rotserve command and vLLM can load.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("gguf_file", metavar="FILE", help="the .gguf file")
    p.add_argument("out", metavar="OUT", help="the model directory to write (new or empty)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the weights")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = convert_gguf(args.gguf_file, args.out, args.dtype)
    except ConvertError as e:
        print(f"convert-gguf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}); use it as --model {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
