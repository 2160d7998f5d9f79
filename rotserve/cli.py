"""`rotserve <command>`: one entry point for every job. Each command is the same code as its
`jobs/*.py` script; `rotserve <command> --help` explains every option and its default."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# command -> (module with build_parser()/main(argv), one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("rotserve.extract.cli", "find the refusal plane from activation statistics"),
    "grid": ("rotserve.pipeline", "generate an angle x prompt grid with vLLM on Ray, to Parquet"),
    "judge": ("rotserve.judge.cli", "judge every row of a grid run with a judge model on vLLM"),
    "capability": (
        "rotserve.capability.cli",
        "lm-eval tasks at every steering setting of a run, in one mixed batch",
    ),
    "report": ("rotserve.report.cli", "summarise a grid run: refusal per angle, polar plot"),
    "serve": ("rotserve.serve", "OpenAI-compatible vLLM server with per-request angles"),
    "selftest": ("rotserve.selftest", "prove steering is live and right on this stack (run first)"),
    "graphcheck": (
        "rotserve.graphcheck",
        "torch only, no vLLM: the rotation table under torch.compile and CUDA graphs",
    ),
    "convert-gguf": ("rotserve.convert", "dequantise a GGUF model file into an HF model directory"),
}

USAGE = """usage: rotserve <command> [options]

Steer a chat model by rotating its activations inside a 2D refusal plane.

commands:
{commands}

A typical session:
  rotserve extract --model Qwen/Qwen2.5-7B-Instruct --out qwen7b.safetensors
  rotserve grid --model Qwen/Qwen2.5-7B-Instruct --plane qwen7b.safetensors --angles 72
  rotserve judge runs/<run> --judge cais/HarmBench-Llama-2-13b-cls --rubric harmbench
  rotserve capability runs/<run> --tasks tinyMMLU,tinyArc
  rotserve report runs/<run>

With no options every command runs on the embedded toy refusal model (data/toy-refusal).
Run `rotserve <command> --help` for its options.
"""


class DefaultsFormatter(argparse.HelpFormatter):
    """Every command's --help: "(default: X)" after each option that does not already say it
    (flags and options whose default is None describe their default in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, argparse.SUPPRESS) or isinstance(default, bool):
            return text
        return f"{text} (default: %(default)s)"


def positive_int(flag: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= 1, the error naming `flag`."""
    return _whole_number(flag, 1, "must be at least 1")


def non_negative_int(flag: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= 0, the error naming `flag`."""
    return _whole_number(flag, 0, "must be >= 0")


def _whole_number(flag: str, least: int, rule: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{flag} {rule}, got {value}")
        return value

    return parse


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from rotserve import __version__

        print(f"rotserve {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rotserve: unknown command {name!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv[0] = f"rotserve {name}"  # argparse names the program after argv[0] in --help
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
