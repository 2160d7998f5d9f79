"""Train the toy judge (data/toy-judge/): the behaviour-rubric judge of the tests and the demo.

    python jobs/train_toy_judge.py                 # ~4-7 min on one core
    python jobs/train_toy_judge.py --steps 100 --out /tmp/judge

See tools/toy_refusal/judge.py for the data and data/toy-judge/README.md for what it scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is a repository folder

from rotserve.paths import toy_judge_dir  # noqa: E402
from tools.toy_refusal.judge import JudgeTrainConfig, train_toy_judge  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = JudgeTrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=toy_judge_dir(), help="output model directory")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for data, init and order")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    args = p.parse_args(argv)
    cfg = JudgeTrainConfig(seed=args.seed, steps=args.steps, threads=args.threads)
    report = train_toy_judge(args.out, cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
