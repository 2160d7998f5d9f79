"""The capability job: lm-eval tasks at every steering setting of a grid run, in one mixed batch.

    python jobs/capability.py runs/grid-<run id> --tasks toy_reply_mc,toy_reply_gen
    python jobs/capability.py --model data/toy-refusal --angle-list 0,90,180 --tasks toy_reply_mc
    python jobs/capability.py --help                     # every option and its default

See rotserve/capability/ for the pipeline and docs/SCHEMA.md for the capability table.
"""

import sys

from rotserve.capability.cli import main

if __name__ == "__main__":  # vLLM spawns engine processes: keep the guard
    sys.exit(main())
