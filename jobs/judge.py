"""The judge job: a judge model over every row of a grid run, to a verdict table beside it.

    python jobs/judge.py runs/grid-<run id>                        # the toy judge, behaviour rubric
    python jobs/judge.py RUN_DIR --judge cais/HarmBench-Llama-2-13b-cls --rubric harmbench
    python jobs/judge.py --help                                    # every option and its default

See rotserve/judge/ for the pipeline and docs/SCHEMA.md for the verdict table.
"""

import sys

from rotserve.judge.cli import main

if __name__ == "__main__":  # vLLM spawns engine processes: keep the guard
    sys.exit(main())
