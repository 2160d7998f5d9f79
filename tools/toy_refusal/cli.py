"""Train the toy refusal model (a 4-layer, 128-wide Qwen2) and save it to data/toy-refusal/.

The model is trained on procedurally generated chats (tools/toy_refusal/synthetic.py): harmful-type
requests answered with refusals, harmless ones answered helpfully. At the end it prints refusal
rates with greedy decoding on two held-out sets: the synthetic held-out split and the
hand-written data/prompts/*.jsonl sets. Deterministic for a given seed and thread count.

    python jobs/train_toy.py                      # defaults: ~5 min on an idle core (1 thread)
    python jobs/train_toy.py --steps 200 --out /tmp/toy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rotserve.paths import toy_model_dir
from tools.toy_refusal.train import TrainConfig, train_toy


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=toy_model_dir(), help="output model directory")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for data, init and order"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="chats per step"
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate")
    parser.add_argument(
        "--n-train", type=int, default=defaults.n_train, help="harmful-type training chats"
    )
    parser.add_argument(
        "--harmless-ratio",
        type=float,
        default=defaults.harmless_ratio,
        help="harmless training chats per harmful one",
    )
    parser.add_argument(
        "--helpful-steps",
        type=int,
        default=defaults.helpful_steps,
        help="first steps on harmless chats only (a helpful base before refusal training)",
    )
    parser.add_argument(
        "--novel",
        type=float,
        default=defaults.novel,
        help="share of harmless training chats about made-up words (teaches: unknown -> answer)",
    )
    parser.add_argument(
        "--n-heldout", type=int, default=defaults.n_heldout, help="held-out chats per label"
    )
    parser.add_argument(
        "--layer-drop",
        type=float,
        default=defaults.layer_drop,
        help="chance that a step skips each decoder layer: spreads the refusal decision over "
        "all layers, which is what puts the max_sim plane's refusal peak at 0 degrees",
    )
    parser.add_argument("--layers", type=int, default=defaults.num_layers, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=defaults.hidden_size, help="hidden size")
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="torch threads (results are reproducible for a fixed count)",
    )
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        n_train=args.n_train,
        harmless_ratio=args.harmless_ratio,
        novel=args.novel,
        helpful_steps=args.helpful_steps,
        n_heldout=args.n_heldout,
        layer_drop=args.layer_drop,
        num_layers=args.layers,
        hidden_size=args.hidden,
        threads=args.threads,
    )
    report = train_toy(args.out, cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
