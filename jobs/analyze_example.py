"""Analyse a grid run from its Parquet alone, with pandas and DuckDB: the polar plot again, and
what the model actually said in each region of the circle.

    python jobs/analyze_example.py                    # the newest runs/grid-* directory
    python jobs/analyze_example.py runs/grid-362b525806c3 --examples 2

Writes RUN_DIR/analysis/refusal_polar.png and RUN_DIR/analysis/examples.md. Needs pandas and
duckdb (the `dev` extra); rotserve itself is not imported: a run's rows/ folder is plain Parquet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Four quarters of the circle, centred on the plane's axes: 0° = toward refusal (b1).
REGIONS = {
    "toward refusal (315°-45°)": (315.0, 45.0),
    "b2 side (45°-135°)": (45.0, 135.0),
    "away from refusal (135°-225°)": (135.0, 225.0),
    "-b2 side (225°-315°)": (225.0, 315.0),
}


def newest_run(root: Path = Path("runs")) -> Path:
    runs = sorted(root.glob("*/rows"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(
            f"no run found under {root}/; run `python jobs/grid.py` first or pass RUN_DIR"
        )
    return runs[-1].parent


def refusal_by_angle(rows_dir: Path):
    """DuckDB straight on the part files: refusal rate per dataset, mask and angle."""
    import duckdb

    return duckdb.sql(
        f"""
        select dataset, adaptive, angle, avg(refusal::int) as refusal, avg(fluency) as fluency,
               count(*) as n
        from read_parquet('{rows_dir}/*.parquet')
        group by all order by dataset, adaptive, angle nulls first
        """
    ).df()


def plot(summary, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    masks = sorted(summary["adaptive"].unique())
    fig, axes = plt.subplots(
        1, len(masks), subplot_kw={"projection": "polar"}, figsize=(5.5 * len(masks), 5.5)
    )
    for ax, adaptive in zip(np.atleast_1d(axes), masks, strict=True):
        part = summary[summary["adaptive"] == adaptive]
        for dataset, g in part.groupby("dataset"):
            steered = g.dropna(subset=["angle"]).sort_values("angle")
            theta = np.deg2rad(np.append(steered["angle"], steered["angle"].iloc[0]))
            r = np.append(steered["refusal"], steered["refusal"].iloc[0])
            (line,) = ax.plot(theta, r, marker=".", label=dataset)
            base = g[g["angle"].isna()]["refusal"]
            if len(base):
                ax.plot(np.linspace(0, 2 * np.pi, 200), [base.iloc[0]] * 200, "--",
                        color=line.get_color(), lw=1, label=f"{dataset} baseline")  # fmt: skip
        ax.set_ylim(0, 1.05)
        ax.set_title("adaptive" if adaptive else "plain")
    np.atleast_1d(axes)[0].legend(loc="lower left", bbox_to_anchor=(0, -0.25), ncol=2)
    fig.suptitle("refusal rate by angle (from Parquet, via DuckDB)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def in_region(angles, lo: float, hi: float):
    return (angles >= lo) & (angles < hi) if lo < hi else (angles >= lo) | (angles < hi)


def examples(rows_dir: Path, per_cell: int = 1) -> str:
    """pandas: for each dataset and circle region, a few generations, first prompt ids first."""
    import pandas as pd

    df = pd.read_parquet(rows_dir, columns=["dataset", "prompt_id", "instruction", "angle",
                                            "adaptive", "generation", "refusal"])  # fmt: skip
    lines = ["# Example generations by region of the circle", ""]
    steered = df.dropna(subset=["angle"])
    for dataset, g in steered.groupby("dataset"):
        lines += [f"## {dataset}", "", "| region | angle | refused | instruction | generation |"]
        lines += ["|---|---|---|---|---|"]
        for name, (lo, hi) in REGIONS.items():
            cell = g[in_region(g["angle"], lo, hi)].sort_values(["prompt_id", "angle"])
            for _, row in cell.head(per_cell).iterrows():
                text = " ".join(str(row.generation).split())[:160].replace("|", "\\|")
                lines.append(
                    f"| {name} | {row.angle:g}° | {'yes' if row.refusal else 'no'} "
                    f"| {row.instruction[:70]} | {text} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "run_dir",
        nargs="?",
        type=Path,
        help="a grid run directory (default: the newest under runs/)",
    )
    p.add_argument(
        "--examples", type=int, default=1, help="generations per dataset and region (default: 1)"
    )
    args = p.parse_args(argv)
    run_dir = args.run_dir or newest_run()
    rows_dir = run_dir / "rows"
    if not rows_dir.is_dir():
        raise SystemExit(f"{run_dir} has no rows/ folder: is it a rotserve grid run directory?")
    summary = refusal_by_angle(rows_dir)
    out = run_dir / "analysis"
    print(f"plot      {plot(summary, out / 'refusal_polar.png')}")
    md = out / "examples.md"
    md.write_text(examples(rows_dir, args.examples))
    print(f"examples  {md}")
    print(summary[summary["angle"].isna()].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
