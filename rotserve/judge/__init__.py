"""Judges: a judge model over every row of a grid run, verdicts as a table beside the rows.

    result = run_judge(JudgeConfig(run_dir="runs/grid-<id>", judge="...", rubric="behaviour"))
    verdicts = rotserve.rundir.read_verdicts(result.run_dir, result.name)

rubrics.py (templates, labels, readings), prompts.py (rendering, the clip, the context rule)
and verdict.py (label probabilities, the choice constraint) are pure;
plan.py cuts the rows into shards; store.py is the verdict table (a fan-out PartStore);
engine.py is the judge engine and its worker; job.py chains them on rotserve.fanout.
"""

from rotserve.judge.config import JudgeConfig, JudgeConfigError
from rotserve.judge.job import JudgeResult, run_judge
from rotserve.judge.rubrics import BUILTIN, Rubric, RubricError, load_rubric

__all__ = [
    "BUILTIN",
    "JudgeConfig",
    "JudgeConfigError",
    "JudgeResult",
    "Rubric",
    "RubricError",
    "load_rubric",
    "run_judge",
]
