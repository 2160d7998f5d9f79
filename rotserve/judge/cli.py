"""`rotserve judge RUN_DIR` / `python jobs/judge.py RUN_DIR`: judge every row of a grid run.

Every input is checked before Ray or vLLM start (rotserve.judge.config.resolve); errors exit
with status 2 and one line saying what to fix.
"""

from __future__ import annotations

import argparse
import sys

from rotserve.cli import DefaultsFormatter, positive_int
from rotserve.dtype import DTYPES
from rotserve.fanout.cli import add_execution_args, execution_from_args, run_guarded
from rotserve.judge.config import JudgeConfig, JudgeConfigError
from rotserve.judge.rubrics import BUILTIN


def build_parser() -> argparse.ArgumentParser:
    d = JudgeConfig(run_dir="")
    p = argparse.ArgumentParser(
        description=(
            "Run a judge model over every row of a finished grid run and write its verdicts as "
            "their own Parquet table, RUN_DIR/verdicts/<judge>.<rubric>/, keyed to the rows by "
            "row_key; `rotserve report RUN_DIR` then shows each label's share and mean "
            "probability per angle. Each verdict is read as the rubric's own evaluation reads "
            "it (harmbench*: one free token, yes or not; llamaguard: first line safe/unsafe; "
            "behaviour and rubric files: constrained to the labels), with every label's "
            "probability from the judge's log-probs. Rerunning the same command resumes an "
            "interrupted table."
        ),
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a complete run directory of `rotserve grid`")
    g = p.add_argument_group("the judge")
    g.add_argument(
        "--judge",
        default=d.judge,
        help="judge model: HF directory or hub id, a stock model without a plane, e.g. "
        "cais/HarmBench-Llama-2-13b-cls or meta-llama/Llama-Guard-3-8B (default: the shipped "
        "toy judge, %(default)s, trained on the behaviour rubric)",
    )
    g.add_argument(
        "--rubric",
        default=d.rubric,
        help=f"{', '.join(BUILTIN)}, or a rubric file: NAME.toml (template, labels, chat, "
        "min_words, short_label, score_label) or a template text file with {instruction} and "
        "{generation} plus --labels",
    )
    g.add_argument(
        "--labels",
        default=None,
        metavar="A,B,...",
        help="labels of a template-file rubric, comma-separated (default: none; a .toml "
        "rubric has its own)",
    )
    g.add_argument(
        "--name",
        default=None,
        help="the verdict table's name (default: <judge directory name or org--name>.<rubric>)",
    )
    g.add_argument(
        "--revision", default=None, help="hub revision of --judge (default: the default branch)"
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=d.dtype,
        help="judge dtype in vLLM (auto: bfloat16 on a CPU with native bf16, float32 on other "
        "CPUs, the checkpoint's dtype on a GPU)",
    )
    g.add_argument(
        "--max-model-len",
        type=positive_int("--max-model-len"),
        default=None,
        help="the judge's context in tokens; a prompt + generation that does not fit has its "
        "generation cut to its first tokens, counted in the manifest (default: the judge's "
        "max positions, at most 8192)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run vLLM without torch.compile and CUDA graphs (faster start, slower steps)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--shard-size",
        type=positive_int("--shard-size"),
        default=d.shard_size,
        help="rows per judge generate call and per part file (the unit of resume)",
    )
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a verdict table of the same name made with other settings",
    )
    o.add_argument(
        "--no-report", dest="report", action="store_false", help="skip the report afterwards"
    )
    add_execution_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> JudgeConfig:
    return JudgeConfig(
        run_dir=args.run_dir,
        judge=args.judge,
        rubric=args.rubric,
        labels=args.labels,
        name=args.name,
        revision=args.revision,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        execution=execution_from_args(args),
    )


def main(argv: list[str] | None = None) -> int:
    from rotserve.judge.job import run_judge

    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    config = config_from_args(args)
    job = lambda: run_judge(config, argv=["judge", *raw])  # noqa: E731
    result, code = run_guarded("judge", job, (JudgeConfigError,))
    if code:
        return code
    counts = ", ".join(f"{k} {v}" for k, v in result.label_counts.items())
    print(
        f"verdicts {result.name}: {result.rows_total} rows ({result.shards_written} parts written "
        f"now, {result.shards_skipped} resumed; {result.judged} judged, {result.by_rule} by the "
        f"rubric's rule, {result.truncated} truncated, {result.clipped} clipped), "
        f"{result.wall_s:.0f} s\n"
        f"  labels    {counts}"
        + (f" ({result.unparsed} answers the rubric did not know)" if result.unparsed else "")
        + "\n"
        f"  table     {result.table_dir}/   (join to the rows on row_key: docs/SCHEMA.md)\n"
        f"  manifest  {result.manifest_path}"
    )
    if args.report:
        from rotserve.report import make_report

        rep = make_report(result.run_dir)
        print(f"  report    {rep.markdown_path}")
        for path in rep.verdict_plots:
            print(f"  plot      {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
