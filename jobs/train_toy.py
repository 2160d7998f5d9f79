"""Retrain the embedded toy refusal model (data/toy-refusal) with tools/toy_refusal.

Run from a checkout (the trainer is not in the wheel):

    python jobs/train_toy.py --help
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tools/ is a folder of the checkout, not an installed package

from tools.toy_refusal.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
