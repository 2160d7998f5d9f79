"""The grid job: every prompt at every steering angle, on Ray + vLLM, to Parquet; scored, plotted.

    python jobs/grid.py --angles 72          # the toy model, its plane, both shipped prompt sets
    python jobs/grid.py --help               # every option and its default

See rotserve/grid/ for the job, rotserve/pipeline.py for the judge and report after it, and
docs/SCHEMA.md for the output table.
"""

import sys

from rotserve.pipeline import main

if __name__ == "__main__":  # vLLM spawns engine processes: keep the guard
    sys.exit(main())
