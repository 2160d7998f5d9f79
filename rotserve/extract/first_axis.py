"""The first axis b1: the `--select` rules, chosen by statistics alone (no generation).

Every rule is one function with the signature `Choose` (evidence table, candidates, the usable
window indices -> FirstAxis), registered in SELECT_RULES by `@select_rule`. The CLI's
`--select` choices and help, ExtractConfig.validate and `extract --controls` all read the
registry, so adding a rule is one decorated function here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rotserve.extract.candidates import (
    MIN_NORM,
    Candidates,
    CandidateStat,
    ExtractionError,
    unit,
)

# Two AUROCs closer than this are a tie, broken by Cohen's d. On a model that has learned the
# concept many sites separate the held-out prompts perfectly (AUROC = 1), and then the size of
# the gap between the classes is what tells the sites apart.
AUROC_TIE = 1e-6


@dataclass
class FirstAxis:
    b1: torch.Tensor  # unit, float32
    index: int | None  # chosen site; None when b1 is not one site's candidate (mean, random)
    reason: str  # one line for the summary


Choose = Callable[[Sequence[CandidateStat], Candidates, list[int]], FirstAxis]


@dataclass(frozen=True)
class SelectRule:
    """One `--select` rule: its function and what the CLI and the config need to know of it."""

    choose: Choose  # (table, candidates, usable window indices; never empty) -> FirstAxis
    help: str  # its lines under "--select (b1):" in `rotserve extract --help`
    needs_holdout: bool = False  # reads the held-out statistics: needs --holdout > 0


# In registration order, which is the order --help lists them and --controls writes them.
SELECT_RULES: dict[str, SelectRule] = {}


def select_rule(name: str, *, help: str, needs_holdout: bool = False) -> Callable[[Choose], Choose]:
    """Register the decorated function as `--select name`."""

    def register(choose: Choose) -> Choose:
        SELECT_RULES[name] = SelectRule(choose, help, needs_holdout)
        return choose

    return register


def select_first_axis(
    rule: str,
    table: Sequence[CandidateStat],
    cands: Candidates,
    window: Sequence[int],
) -> FirstAxis:
    """b1 by the named rule, from the non-zero candidates in the window."""
    usable = [i for i in window if float(cands.norms[i]) > MIN_NORM]
    if not usable:
        raise ExtractionError(
            "every candidate in the window is zero: the harmful and harmless activations have "
            "the same mean there; check the prompt files or widen --layers"
        )
    if rule not in SELECT_RULES:
        raise ExtractionError(f"unknown --select {rule!r}; choose from {', '.join(SELECT_RULES)}")
    return SELECT_RULES[rule].choose(table, cands, usable)


@select_rule(
    "max_sim",
    help="the candidate with the highest mean cosine to all candidates (the choice of\n"
    "the original angular steering method)",
)
def max_sim(table: Sequence[CandidateStat], cands: Candidates, usable: list[int]) -> FirstAxis:
    """The candidate with the highest mean cosine to the others."""
    i = max(usable, key=lambda j: table[j].mean_cosine)
    return FirstAxis(cands.d[i], i, f"mean cosine {table[i].mean_cosine:.3f}")


@select_rule("max_norm", help="the candidate with the largest ||r||, excluding the final site")
def max_norm(table: Sequence[CandidateStat], cands: Candidates, usable: list[int]) -> FirstAxis:
    """The candidate with the longest r_i, excluding the final site unless it is alone.

    The last layer's output feeds only the unembedding: its difference is about the next
    token, not the concept.
    """
    last = len(table) - 1
    pool = [j for j in usable if j != last] or usable
    i = max(pool, key=lambda j: table[j].norm)
    return FirstAxis(cands.d[i], i, f"||r|| {table[i].norm:.3f}")


@select_rule("mean", help="the normalised mean of all candidates")
def mean(table: Sequence[CandidateStat], cands: Candidates, usable: list[int]) -> FirstAxis:
    """The normalised mean of all candidates in the window: no one site's candidate."""
    b1 = unit(cands.d[usable].double().mean(0)).float()
    if float(b1.norm()) < 0.5:
        raise ExtractionError("the candidates cancel out: their mean is zero; use --select max_sim")
    return FirstAxis(b1, None, f"mean of {len(usable)} candidates")


@select_rule(
    "separability",
    help="hold out --holdout of each class (seeded by --seed), compute the candidates on\n"
    "the rest, project every held-out activation onto its site's candidate and\n"
    "pick the site that separates harmful from harmless best: highest AUROC, ties\n"
    f"(within {AUROC_TIE:g}) broken by the larger Cohen's d. b1 is then that site's\n"
    "candidate from all prompts. AUROC and Cohen's d are reported for every site\n"
    "whatever --select is, as long as --holdout > 0.",
    needs_holdout=True,
)
def separability(table: Sequence[CandidateStat], cands: Candidates, usable: list[int]) -> FirstAxis:
    """The site whose held-out projections separate the classes best.

    Highest AUROC, ties (within AUROC_TIE) broken by the larger Cohen's d; b1 is that site's
    candidate from all prompts.
    """
    if any(table[j].auroc is None or math.isnan(table[j].auroc) for j in usable):
        raise ExtractionError(
            "--select separability needs held-out prompts: set --holdout above 0 "
            "(each class needs at least 2 prompts)"
        )
    i = max(usable, key=lambda j: _separability_key(table[j]))
    return FirstAxis(
        cands.d[i],
        i,
        f"held-out AUROC {table[i].auroc:.3f}, Cohen's d {_fmt(table[i].cohens_d)}",
    )


def _separability_key(row: CandidateStat) -> tuple[float, float]:
    # Rounding AUROC to the tie tolerance makes near-equal AUROCs compare equal, so the tuple
    # order falls through to Cohen's d.
    d = row.cohens_d if row.cohens_d is not None and not math.isnan(row.cohens_d) else -math.inf
    return (round(float(row.auroc or 0.0) / AUROC_TIE) * AUROC_TIE, d)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
