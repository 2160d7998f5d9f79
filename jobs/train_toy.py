"""Retrain the embedded toy refusal model (data/toy-refusal); same code as `rotserve train-toy`.

python jobs/train_toy.py --help
"""

from rotserve.toy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
