"""`rotserve judge RUN_DIR` / `python jobs/judge.py RUN_DIR`: judge every row of a grid run.

Every input is checked before Ray or vLLM start (rotserve.judge.config.resolve); errors exit
with status 2 and one line saying what to fix. Three more commands work on a run's verdicts
without any model: `rotserve judge keyword RUN_DIR` (the keyword markers as a verdict table),
`rotserve judge audit RUN_DIR ...` and `rotserve judge audit-import RUN_DIR FILE` (a human
audit, rotserve.judge.audit). A run directory named like one of them: write ./audit.
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
        epilog=(
            "More commands on a run's verdicts, no model needed: `rotserve judge keyword "
            "RUN_DIR` (the keyword markers as a second verdict table), `rotserve judge audit "
            "RUN_DIR --sample N --out FILE` and `rotserve judge audit-import RUN_DIR FILE` (a "
            "human audit); each has --help."
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
        "min_words, short_label, score_label, axis, [[anchors]]) or a template text file with "
        "{instruction} and "
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
    c = p.add_argument_group(
        "the judge canary: before any row, every judge engine labels the rubric's anchor rows "
        "(data/anchors/, or a rubric file's [[anchors]]); more than one miss, or one label for "
        "every anchor, stops the run and prints what it answered"
    )
    c.add_argument(
        "--skip-judge-canary",
        action="store_true",
        help="do not run the canary (recorded in the manifest)",
    )
    c.add_argument(
        "--accept-judge-canary-failure",
        action="store_true",
        help="run the canary, record a failure in the manifest, and judge anyway",
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
        skip_canary=args.skip_judge_canary,
        accept_canary_failure=args.accept_judge_canary_failure,
        execution=execution_from_args(args),
    )


def main(argv: list[str] | None = None) -> int:
    from rotserve.judge.job import run_judge

    raw = list(sys.argv[1:] if argv is None else argv)
    if raw and raw[0] in SUBCOMMANDS:
        return SUBCOMMANDS[raw[0]](raw[1:])
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
        f"  canary    {canary_text(result.canary)}\n"
        f"  table     {result.table_dir}/   (join to the rows on row_key: docs/SCHEMA.md)\n"
        f"  manifest  {result.manifest_path}"
    )
    if args.report:
        from rotserve.report import make_report

        rep = make_report(result.run_dir)
        print(f"  report    {rep.markdown_path}")
        for path in rep.verdict_plots:
            print(f"  plot      {path}")
        if rep.agreement is not None and rep.agreement.markdown_path is not None:
            print(f"  judges    {rep.agreement.markdown_path}")
            if rep.agreement.short_text():
                print(rep.agreement.short_text())
    return 0


def canary_text(record: dict) -> str:
    """The manifest's canary record in a few words."""
    status = record.get("status", "not run")
    if "anchors" in record and "misses" in record:
        n, miss = record["anchors"], record["misses"]
        status += f": {n - miss} of {n} anchors right"
    if record.get("why"):
        status += f" ({record['why']})"
    if record.get("override"):
        status += f", override {record['override']}"
    return status


def keyword_main(argv: list[str]) -> int:
    from rotserve.judge.keyword import NAME, keyword_verdicts
    from rotserve.rundir import RunDirError

    p = argparse.ArgumentParser(
        prog="rotserve judge keyword",
        description=(
            f"Write the keyword refusal markers as a verdict table, RUN_DIR/verdicts/{NAME}/ "
            "(refusal: the generation holds a marker; answer: it holds none), from the rows' "
            "own refusal column: no model, no engine, under a second. The report then sets "
            "every judge beside it on the shared axis."
        ),
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a complete run directory")
    p.add_argument("--overwrite", action="store_true", help="replace a table of the same name")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the report")
    args = p.parse_args(argv)
    try:
        res = keyword_verdicts(
            args.run_dir, overwrite=args.overwrite, argv=["judge", "keyword", *argv]
        )
    except RunDirError as e:
        print(f"judge keyword: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in res.label_counts.items())
    print(f"verdicts {res.name}: {counts}\n  table     {res.table_dir}/")
    return _report(args.run_dir) if args.report else 0


def audit_main(argv: list[str]) -> int:
    from rotserve.judge.audit import AuditError, write_audit
    from rotserve.rundir import RunDirError

    p = argparse.ArgumentParser(
        prog="rotserve judge audit",
        description=(
            "Write a blind, stratified sample of a run's rows as a CSV for a person to label in "
            "a spreadsheet: instruction, generation, a blank label column and the rubric's "
            "allowed labels (no judge's label, angle or dataset). Strata: angle region "
            "(baseline, around 0/90/180/270 degrees) x the label of one judge table (--by); "
            "they take turns, seeded, until N rows. The sample is recorded in "
            "RUN_DIR/audits/<sample>.json; read the labels back with `rotserve judge "
            "audit-import RUN_DIR FILE`."
        ),
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a complete run directory")
    p.add_argument(
        "--sample", type=positive_int("--sample"), default=60, metavar="N", help="rows to sample"
    )
    p.add_argument("--seed", type=int, default=0, help="the sample's seed")
    p.add_argument("--out", required=True, metavar="FILE", help="the CSV to write")
    p.add_argument(
        "--by",
        default=None,
        metavar="TABLE",
        help="the verdict table whose labels stratify the sample (default: the first model "
        "judge's table, else the keyword table, else regions only)",
    )
    p.add_argument(
        "--rubric",
        default=None,
        help="the rubric whose labels the person gives: a built-in or a rubric file (default: "
        "the --by table's built-in rubric, else behaviour)",
    )
    args = p.parse_args(argv)
    try:
        s = write_audit(
            args.run_dir, args.sample, args.out, seed=args.seed, by=args.by, rubric=args.rubric
        )
    except (AuditError, RunDirError) as e:
        print(f"judge audit: error: {e}", file=sys.stderr)
        return 2
    strata = "; ".join(f"{k} {v}" for k, v in s.strata.items())
    print(
        f"audit sample {s.sample}: {s.items} rows of {args.run_dir}, stratified by region"
        + (f" x {s.by}" if s.by else "")
        + f" ({strata})\n"
        f"  label     each row's `label` with one of: {', '.join(s.rubric.labels)}\n"
        f"  rubric    {s.rubric.name}: {s.rubric.description}\n"
        f"  file      {s.path}\n"
        f"  record    {s.record}\n"
        f"  then      rotserve judge audit-import {args.run_dir} {s.path}"
    )
    return 0


def audit_import_main(argv: list[str]) -> int:
    from rotserve.judge.audit import AuditError, import_audit
    from rotserve.rundir import RunDirError

    p = argparse.ArgumentParser(
        prog="rotserve judge audit-import",
        description=(
            "Read a labelled audit file back as the verdict table of judge `human`, "
            "RUN_DIR/verdicts/human.<rubric>/, under the sampled rows' keys. Refused, naming "
            "the line: a file of another run or sample, missing, extra, repeated or relabelled "
            "rows, blank labels, labels outside the rubric. The report then shows each judge's "
            "agreement with the human labels."
        ),
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run the sample was drawn from")
    p.add_argument("file", metavar="FILE", help="the labelled CSV")
    p.add_argument("--name", default=None, help="the table's name (default: human.<rubric>)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a human table with other labels"
    )
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the report")
    args = p.parse_args(argv)
    try:
        res = import_audit(
            args.run_dir,
            args.file,
            name=args.name,
            overwrite=args.overwrite,
            argv=["judge", "audit-import", *argv],
        )
    except (AuditError, RunDirError) as e:
        print(f"judge audit-import: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in res.label_counts.items())
    print(f"verdicts {res.name}: {counts}\n  table     {res.table_dir}/")
    return _report(args.run_dir) if args.report else 0


def _report(run_dir: str) -> int:
    from rotserve.report import make_report

    rep = make_report(run_dir)
    print(f"  report    {rep.markdown_path}")
    if rep.agreement is not None and rep.agreement.markdown_path is not None:
        print(f"  judges    {rep.agreement.markdown_path}")
        if rep.agreement.short_text():
            print(rep.agreement.short_text())
    return 0


SUBCOMMANDS = {"keyword": keyword_main, "audit": audit_main, "audit-import": audit_import_main}


if __name__ == "__main__":
    sys.exit(main())
