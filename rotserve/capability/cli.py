"""`rotserve capability` / `python jobs/capability.py`: lm-eval tasks at every steering setting.

Every input is checked before Ray or vLLM start (rotserve.capability.config.resolve); errors exit
with status 2 and one line saying what to fix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rotserve.cli import DefaultsFormatter, non_negative_int, positive_int
from rotserve.dtype import DTYPES
from rotserve.fanout.cli import add_execution_args, execution_from_args, run_guarded
from rotserve.grid.config import (
    MASKS,
    GridConfigError,
    evenly_spaced,
    parse_angle_count,
    parse_angle_list,
)

if TYPE_CHECKING:
    from rotserve.capability.config import CapabilityConfig

DESCRIPTION = """\
Evaluate lm-evaluation-harness tasks at every steering setting of a grid run (every plane,
layer window, angle and mask, plus the unsteered baseline), or at settings given here for a
model (--model, --plane, --angles/--angle-list, --mask, --layers). lm-eval builds each task's
requests once; rotserve's engine answers all of them at every setting in one mixed continuous
batch (log-likelihoods as steered prompt log-probs, generations with the task's stop strings),
fanned out over Ray; then lm-eval's own metric code scores each setting. The scores equal what
lm-eval's local-completions model reports against `rotserve serve` with the model name MODEL@θ.

A task is anything lm-eval runs: a task, group or tag name of lm-eval's own (tinyMMLU,
arc_easy, mmlu; these download their datasets from the HF hub) or the `task:` name of a YAML
task file in a folder given with --include-path (a local task: dataset_path: json and
dataset_kwargs.data_files pointing at your JSONL needs no network). rotserve ships two for the
toy model, always included: toy_reply_mc (multiple choice) and toy_reply_gen (generation).

Writes RUN_DIR/capability/<name>/ (with --model: --out DIR/capability/<name>/):
  scores.parquet        task, metric, filter, value, stderr and the setting (angle, adaptive,
                        plane, window; angle null = the baseline): one row per task x metric x
                        setting
  answers/part-*.parquet  the engine's answer to every (request, setting): log-prob or text
  items.parquet         which lm-eval request (task, document, choice) each answer serves
  manifest.json         settings, tasks and their configs, counts, versions, timings
Rerunning the same command resumes an interrupted table; a finished one is rescored from its
answers without starting an engine."""


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A GridConfigError as argparse's own error (exit status 2, usage line)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except GridConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def _limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit takes a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {text}")
    return int(value) if value >= 1 and value == int(value) else value


def _tasks(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise argparse.ArgumentTypeError("--tasks is empty; give lm-eval task names, e.g. arc_easy")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=DESCRIPTION,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        nargs="?",
        default=None,
        help="a run directory of `rotserve grid` whose settings to evaluate (omit it and give "
        "--model for settings of your own)",
    )
    t = p.add_argument_group("what to evaluate")
    t.add_argument(
        "--tasks",
        type=_tasks,
        required=True,
        metavar="T1,T2",
        help="lm-eval task, group or tag names, comma-separated, e.g. toy_reply_mc,toy_reply_gen "
        "or tinyMMLU,tinyArc (required: no default)",
    )
    t.add_argument(
        "--include-path",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder (or one file) of lm-eval task YAMLs, as lm-eval's --include_path; "
        "repeatable; its tasks override lm-eval's own of the same name (default: none beyond the "
        "shipped data/tasks)",
    )
    t.add_argument(
        "--limit",
        type=_limit,
        default=None,
        help="documents per task (a fraction if < 1), as lm-eval's --limit; for quick looks, not "
        "for reported scores (default: all)",
    )
    t.add_argument(
        "--num-fewshot",
        type=non_negative_int("--num-fewshot"),
        default=None,
        help="few-shot examples per prompt (default: each task's own)",
    )
    t.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="render prompts with the model's chat template, as lm-eval's --apply_chat_template",
    )
    t.add_argument(
        "--max-length",
        type=positive_int("--max-length"),
        default=None,
        help="lm-eval's max_length: inputs are left-truncated to max_length - 1 tokens; pass "
        "the same to local-completions to compare (default: 2048, at most the model's positions)",
    )
    t.add_argument(
        "--bootstrap-iters",
        type=non_negative_int("--bootstrap-iters"),
        default=100000,
        help="lm-eval's bootstrap iterations for a stderr without a closed form; 0 skips them",
    )
    s = p.add_argument_group(
        "the settings",
        "With RUN_DIR: every setting of the run plus the baseline, or the subset these flags ask "
        "for (the run must have each). Without RUN_DIR (--model): the settings these flags make, "
        "as `rotserve grid` reads them.",
    )
    s.add_argument(
        "--model",
        default=None,
        help="HF model directory or hub id to evaluate without a run, e.g. data/toy-refusal "
        "(default: none, the run's model)",
    )
    s.add_argument(
        "--revision", default=None, help="hub revision of --model (default: the default branch)"
    )
    s.add_argument(
        "--plane",
        action="append",
        default=None,
        metavar="[NAME=]FILE|NAME",
        help="with --model: the plane file (repeat as NAME=FILE for several; default "
        "MODEL/plane.safetensors); with RUN_DIR: one of the run's planes by name (repeatable)",
    )
    s.add_argument(
        "--layers",
        action="append",
        default=None,
        metavar="WINDOW",
        help="a layer window (all, a:b, 3,4,5, selective), repeatable; with RUN_DIR, one of the "
        "run's windows (default: all, or the run's)",
    )
    angles = s.add_mutually_exclusive_group()
    angles.add_argument(
        "--angles",
        type=_arg(parse_angle_count),
        default=None,
        metavar="N",
        help="N angles evenly spaced from 0° (default: the run's, or 36 with --model)",
    )
    angles.add_argument(
        "--angle-list",
        type=_arg(parse_angle_list),
        default=None,
        metavar="DEG,DEG,...",
        help="explicit angles in degrees, e.g. 0,90,180 (default: the run's, or --angles)",
    )
    s.add_argument(
        "--mask",
        choices=MASKS,
        default=None,
        help="plain, adaptive or both (default: the run's, or plain with --model)",
    )
    s.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the unsteered model (by default it is evaluated too, angle null)",
    )
    s.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="engine dtype (default: the run's, or auto: bfloat16 on a CPU with native bf16, "
        "float32 on other CPUs, the checkpoint's dtype on a GPU)",
    )
    s.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="run vLLM without torch.compile and CUDA graphs (default: the run's, or off)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--name",
        default=None,
        help="the table's name (default: the task names joined with +)",
    )
    o.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="with --model: the directory that gets capability/<name>/ (default: "
        "runs/capability-<id>)",
    )
    o.add_argument(
        "--shard-size",
        type=positive_int("--shard-size"),
        default=512,
        help="(request, setting) answers per generate call and per part file (the unit of resume)",
    )
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a table of the same name made with other tasks or settings",
    )
    o.add_argument(
        "--verbose-tasks", action="store_true", help="show lm-eval's own logging and bars"
    )
    add_execution_args(p)
    return p


class _Formatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description kept as written."""


def config_from_args(args: argparse.Namespace) -> CapabilityConfig:
    from rotserve.capability.config import CapabilityConfig

    angles = args.angle_list
    if args.angles is not None:
        angles = evenly_spaced(args.angles)
    planes: tuple[tuple[str, str], ...] = ()
    plane, plane_names = None, ()
    if args.run_dir is not None:
        plane_names = tuple(args.plane or ())
    elif args.plane:
        if len(args.plane) == 1 and "=" not in args.plane[0]:
            plane = args.plane[0]
        else:
            planes = tuple(_named_plane(v) for v in args.plane)
    return CapabilityConfig(
        tasks=args.tasks,
        run_dir=args.run_dir,
        include_paths=tuple(args.include_path or ()),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
        max_length=args.max_length,
        bootstrap_iters=args.bootstrap_iters,
        model=args.model,
        revision=args.revision,
        plane=plane,
        planes=planes,
        plane_names=plane_names,
        windows=tuple(args.layers or ()),
        angles=angles,
        mask=args.mask,
        baseline=args.baseline,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        shard_size=args.shard_size,
        name=args.name,
        out=args.out,
        overwrite=args.overwrite,
        verbose_tasks=args.verbose_tasks,
        execution=execution_from_args(args),
    )


def _named_plane(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise SystemExit(
            f"capability: error: --plane {value!r}: give NAME=FILE for each of several planes"
        )
    return name, path


def main(argv: list[str] | None = None) -> int:
    from rotserve.capability.config import CapabilityConfigError
    from rotserve.capability.job import run_capability

    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    config = config_from_args(args)
    job = lambda: run_capability(config, argv=["capability", *raw])  # noqa: E731
    result, code = run_guarded("capability", job, (CapabilityConfigError,))
    if code:
        return code
    print(
        f"capability {result.name}: {result.requests} requests × {result.settings} settings = "
        f"{result.answers_total} answers ({result.shards_written} parts written now, "
        f"{result.shards_skipped} resumed), scored in {result.score_s:.1f} s, "
        f"{result.wall_s:.0f} s in all\n"
        f"  scores    {result.scores_path}\n"
        f"  answers   {result.table_dir / 'answers'}/\n"
        f"  manifest  {result.manifest_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
