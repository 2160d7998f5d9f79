"""`rotserve extract` / `python jobs/extract.py`: a thin argparse layer over extract_plane."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from rotserve.dtype import DTYPES
from rotserve.extract.activations import POSITIONS
from rotserve.extract.config import ExtractConfig
from rotserve.extract.first_axis import SELECT_RULES
from rotserve.extract.pipeline import extract_plane
from rotserve.extract.second_axis import SECOND_METHODS

DESCRIPTION = """\
Choose the refusal direction b1 and the steering plane (b1, b2) from statistics of the model's
activations. Only forward passes: no text is generated.

Every layer gives two candidate sites, resid_mid (input of the pre-MLP norm) and resid_post
(layer output): 2L candidates. At each site, in float32: normalise each prompt's activation,
average per class, renormalise, r = mean_harmful - mean_harmless, d = r/||r||.
With no arguments it runs on the toy refusal model shipped in data/toy-refusal with the prompt
sets in data/prompts.
"""


def _epilog() -> str:
    """The rules and methods of --select and --second, read from their registries."""
    return f"""\
--select (b1):
{_listing((name, rule.help) for name, rule in SELECT_RULES.items())}
--second (b2):
{_listing((name, method.help) for name, method in SECOND_METHODS.items())}
--random-b1 makes b1 random too (with b2 random): the full control.

Output: OUT (.safetensors with b1, b2 and all metadata), and beside it
OUT_STEM.candidates.json / .csv (every candidate: site, layer, ||r||, mean cosine, AUROC,
Cohen's d, cosine with b1, chosen) and OUT_STEM.candidates.png (the evidence figure).
"""


def _listing(entries: Iterable[tuple[str, str]]) -> str:
    """Each name in a 14-column field, its help lines aligned after it."""
    lines = []
    for name, text in entries:
        first, *rest = text.splitlines()
        lines.append(f"  {name:<14}{first}")
        lines += [" " * 16 + line for line in rest]
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The `rotserve extract` flags; every default is ExtractConfig's (read when called)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=_Formatter,
    )
    # One copy of the defaults: the dataclass's. Made here, not at import, so the embedded
    # paths follow a ROTSERVE_DATA_DIR set after import.
    d = ExtractConfig()
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--model", default=d.model, help="HF model id or local directory")
    io.add_argument(
        "--harmful",
        default=d.harmful,
        help="instructions the model should refuse (.jsonl/.json/.csv/.parquet/.txt)",
    )
    io.add_argument(
        "--harmless",
        default=d.harmless,
        help="instructions the model should answer (same formats)",
    )
    io.add_argument(
        "--column",
        default=d.column,
        help="instruction column of the prompt files (default: the first of instruction, goal, "
        "prompt, ... found)",
    )
    io.add_argument(
        "--limit",
        type=int,
        default=d.limit,
        help="use only the first N prompts of each file (default: all)",
    )
    io.add_argument(
        "--out", default=d.out, help="plane file to write; the table and figure go beside it"
    )
    io.add_argument("--no-figure", action="store_true", help="skip the PNG figure")
    io.add_argument(
        "--controls",
        action="store_true",
        help="also write the standard controls beside the plane, from the same statistics: "
        "OUT.ctrl-random-b2 (b2 random), OUT.ctrl-random (b1 and b2 random) and "
        "OUT.ctrl-select-RULE (b1 by each other --select rule); prints the grid command "
        "that compares them all",
    )
    io.add_argument(
        "--chat-template",
        default=d.chat_template,
        metavar="FILE",
        help="Jinja chat template file, for models whose tokenizer has none (default: the tokenizer's)",
    )

    m = p.add_argument_group("method")
    m.add_argument(
        "--select",
        choices=list(SELECT_RULES),
        default=d.select,
        help="how b1 is chosen (see below)",
    )
    m.add_argument(
        "--second",
        choices=list(SECOND_METHODS),
        default=None,  # None: the config's default, or random under --random-b1
        help=f"how b2 is chosen (default: {d.second}; random with --random-b1)",
    )
    m.add_argument(
        "--random-b1",
        action="store_true",
        default=d.random_b1,
        help="random b1 and b2 (seeded): the full control",
    )
    m.add_argument(
        "--layers",
        default=d.layers,
        metavar="WINDOW",
        help="restrict the candidates to these layers: all, a:b (a Python slice) or a list "
        "3,4,5, negatives counting from the end (--layers=-2: when it starts with '-'); "
        "statistics are still reported for every site (default: all layers)",
    )
    m.add_argument(
        "--positions",
        choices=POSITIONS,
        default=d.positions,
        help="'last': the last template token; 'post-instruction': the mean over the template "
        "tokens after the instruction",
    )
    m.add_argument(
        "--holdout",
        type=float,
        default=d.holdout,
        help="fraction of each class held out for the separability statistics (0: none; "
        "the plane itself uses all prompts)",
    )
    m.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the held-out split and of random directions",
    )

    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=d.device, help="torch device (cpu, cuda, cuda:1, ...)")
    r.add_argument(
        "--dtype",
        choices=DTYPES,
        default=d.dtype,
        help="model weights dtype (statistics are float32 whatever this is); auto: the "
        "checkpoint's on a GPU, bfloat16 on a CPU with native bf16, float32 on other CPUs",
    )
    r.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per forward pass")
    r.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=d.trust_remote_code,
        help="allow the model repository's own Python code (off by default: it runs arbitrary code)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout; appends "(default: X)" unless the help already says it.

    Flags (store_true) default to off and say so by being flags.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or isinstance(action, argparse._StoreTrueAction):
            return text
        if action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """The ExtractConfig the parsed flags describe (flags that negate a field: --no-figure,
    --quiet; --second left out: the config's default, random under --random-b1)."""
    return ExtractConfig(
        model=args.model,
        harmful=args.harmful,
        harmless=args.harmless,
        column=args.column,
        limit=args.limit,
        out=args.out,
        select=args.select,
        second=args.second or ("random" if args.random_b1 else ExtractConfig().second),
        random_b1=args.random_b1,
        layers=args.layers,
        positions=args.positions,
        holdout=args.holdout,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code,
        figure=not args.no_figure,
        progress=not args.quiet,
        controls=args.controls,
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run one extraction from the command line; exit status 2 with one line for bad inputs."""
    args = build_parser(prog).parse_args(argv)
    from rotserve.extract.candidates import ExtractionError
    from rotserve.plane import PlaneError
    from rotserve.prompts import ChatTemplateError, PromptFileError
    from rotserve.steering import UnsupportedArchitectureError

    try:
        result = extract_plane(config_from_args(args))
    except (
        ExtractionError,
        PromptFileError,
        ChatTemplateError,
        UnsupportedArchitectureError,
        PlaneError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    if result.controls:
        planes = [f"plane={result.paths['plane']}"]
        planes += [f"{name}={path}" for name, path in result.controls.items()]
        print("  controls: " + ", ".join(result.controls))
        print(
            "  compare them in one run: rotserve grid --model "
            + args.model
            + "".join(f" --plane {p}" for p in planes)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
