"""The statistics behind a plane: sites, candidates and their evidence table.

Pure math on tensors that activations.py hands over; no model, no files. The choice of b1
from these statistics is first_axis.py, that of b2 second_axis.py. Everything that needs to
see every prompt is a streaming accumulator fed one batch at a time, so memory is
O(sites x hidden) whatever the number of prompts:

- `ClassSums`: running float64 sums of the normalised activations a/||a|| per class and site,
  enough for the class means and thus every candidate d_i.
- `HeldOutScores`: one float per held-out prompt and site (its cosine with that site's
  calibration candidate), i.e. O(prompts x sites) scalars, never vectors.

Names: a *site* is one place in the residual stream (resid_mid or resid_post of one layer);
a *candidate* is the unit difference-of-means direction d_i computed at a site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

HARMFUL, HARMLESS = "harmful", "harmless"
LABELS = (HARMFUL, HARMLESS)
SITE_KINDS = ("resid_mid", "resid_post")

# A difference of means shorter than this is no direction (e.g. identical classes at a site
# upstream of where they differ); its candidate is the zero vector and never chosen.
MIN_NORM = 1e-8


class ExtractionError(ValueError):
    """Inputs from which no plane can be extracted; the message says what to change."""


@dataclass(frozen=True)
class Site:
    """One reading point: resid_mid (input of the pre-MLP norm) or resid_post (layer output)."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.kind}"

    @property
    def depth(self) -> float:
        """Position along the stream in layers: resid_mid is halfway through its layer."""
        return self.layer + (0.5 if self.kind == "resid_mid" else 1.0)


def all_sites(num_layers: int) -> list[Site]:
    """The 2L sites in stream order: L0.resid_mid, L0.resid_post, L1.resid_mid, ..."""
    return [Site(i, kind) for i in range(num_layers) for kind in SITE_KINDS]


def window_indices(sites: Sequence[Site], layers: Sequence[int] | None) -> list[int]:
    """Indices of the sites whose layer is in `layers` (None: all)."""
    if layers is None:
        return list(range(len(sites)))
    keep = set(layers)
    return [i for i, s in enumerate(sites) if s.layer in keep]


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / ||x|| along dim; zero vectors stay zero instead of becoming NaN."""
    n = x.norm(dim=dim, keepdim=True)
    return torch.where(n > MIN_NORM, x / n.clamp_min(MIN_NORM), torch.zeros_like(x))


def random_unit(hidden: int, seed: int) -> torch.Tensor:
    """A seeded random unit vector (float32): the random controls' directions."""
    g = torch.Generator().manual_seed(seed)
    return unit(torch.randn(hidden, generator=g, dtype=torch.float64)).float()


# --- First pass: class means and candidates -------------------------------------------------


@dataclass
class ClassSums:
    """Running sums of normalised activations per class: [sites, hidden] float64 each.

    float64 because a sum of a few thousand unit vectors in float32 loses the digits that a
    small difference of means (the candidate) lives in.
    """

    n_sites: int
    hidden: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label in LABELS:
            self.sums.setdefault(label, torch.zeros(self.n_sites, self.hidden, dtype=torch.float64))
            self.counts.setdefault(label, 0)

    def update(self, acts: torch.Tensor, label: str) -> None:
        """acts: [batch, sites, hidden] activations of prompts of one class."""
        _check_acts(acts, self.n_sites, self.hidden)
        self.sums[label] += unit(acts.double()).sum(0)
        self.counts[label] += acts.shape[0]

    def merged(self, other: ClassSums) -> ClassSums:
        return ClassSums(
            self.n_sites,
            self.hidden,
            {k: self.sums[k] + other.sums[k] for k in LABELS},
            {k: self.counts[k] + other.counts[k] for k in LABELS},
        )

    def unit_means(self) -> dict[str, torch.Tensor]:
        """Per class, the mean of the normalised activations, renormalised: [sites, hidden]."""
        for label in LABELS:
            if self.counts[label] == 0:
                raise ExtractionError(f"no {label} activations were collected")
        return {k: unit(self.sums[k] / self.counts[k]) for k in LABELS}

    def candidates(self) -> Candidates:
        means = self.unit_means()
        r = means[HARMFUL] - means[HARMLESS]
        return Candidates(
            r=r.float(), d=unit(r).float(), means={k: v.float() for k, v in means.items()}
        )


@dataclass
class Candidates:
    """r_i = mu_harmful_hat - mu_harmless_hat and d_i = r_i/||r_i|| per site, float32 [sites, H]."""

    r: torch.Tensor
    d: torch.Tensor
    means: dict[str, torch.Tensor]

    @property
    def norms(self) -> torch.Tensor:
        return self.r.norm(dim=1)


def _check_acts(acts: torch.Tensor, n_sites: int, hidden: int) -> None:
    if acts.ndim != 3 or acts.shape[1:] != (n_sites, hidden):
        raise ValueError(
            f"expected activations [batch, {n_sites}, {hidden}], got {tuple(acts.shape)}"
        )


def mean_cosines(d: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """For every site, the mean cosine of its candidate with the candidates in the window.

    The window's own candidates are included (self-similarity 1 adds the same constant to
    each of them, so it does not change which one wins).
    """
    return (d @ d[list(window)].t()).mean(dim=1)


# --- Held-out separability --------------------------------------------------------------------


@dataclass
class HeldOutScores:
    """Per held-out prompt and site, the cosine of a/||a|| with the calibration candidate."""

    directions: torch.Tensor  # [sites, hidden], the candidates from the calibration split
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directions = self.directions.double()
        for label in LABELS:
            self.scores.setdefault(label, [])

    def update(self, acts: torch.Tensor, label: str) -> None:
        _check_acts(acts, *self.directions.shape)
        # einsum over hidden: one scalar per (prompt, site); the vectors are dropped right here.
        self.scores[label].append(torch.einsum("bsh,sh->bs", unit(acts.double()), self.directions))

    def matrix(self, label: str) -> np.ndarray:
        """[prompts, sites] float64."""
        if not self.scores[label]:
            return np.zeros((0, self.directions.shape[0]))
        return torch.cat(self.scores[label]).numpy()

    def stats(self) -> tuple[list[float], list[float]]:
        """(AUROC, Cohen's d) per site; harmful is the positive class."""
        pos, neg = self.matrix(HARMFUL), self.matrix(HARMLESS)
        aurocs, ds = [], []
        for i in range(self.directions.shape[0]):
            aurocs.append(auroc(pos[:, i], neg[:, i]))
            ds.append(cohens_d(pos[:, i], neg[:, i]))
        return aurocs, ds


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a harmful prompt > score of a harmless one), ties counting one half."""
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(y, np.r_[pos, neg]))


def cohens_d(pos: np.ndarray, neg: np.ndarray) -> float:
    """(mean_pos - mean_neg) / pooled standard deviation (ddof 1); inf when the pool is flat."""
    n1, n2 = len(pos), len(neg)
    if n1 == 0 or n2 == 0 or n1 + n2 < 3:
        return math.nan
    var = (
        (n1 - 1) * np.var(pos, ddof=1 if n1 > 1 else 0)
        + (n2 - 1) * np.var(neg, ddof=1 if n2 > 1 else 0)
    ) / (n1 + n2 - 2)
    diff = float(np.mean(pos) - np.mean(neg))
    if var <= 0:
        return math.copysign(math.inf, diff) if diff else math.nan
    return diff / math.sqrt(var)


# --- The table of evidence --------------------------------------------------------------------


@dataclass
class CandidateStat:
    """One row of the evidence table."""

    site: str
    layer: int
    kind: str
    depth: float
    norm: float  # ||r_i||, all prompts
    mean_cosine: float  # with the candidates in the window
    auroc: float | None = None  # held-out, calibration candidate; None without a held-out split
    cohens_d: float | None = None
    cos_b1: float | None = None  # with the final b1
    cos_b2: float | None = None  # with the final b2
    plane_angle: float | None = None  # degrees [0, 360) of the candidate's projection in the plane
    # Projections of the class means (of normalised activations) on the final b1: where they
    # have opposite signs the site separates the classes along b1 (the "selective" layers).
    harmful_b1: float | None = None
    harmless_b1: float | None = None
    in_window: bool = True
    chosen: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def candidate_table(
    sites: Sequence[Site],
    cands: Candidates,
    window: Sequence[int],
    aurocs: Sequence[float] | None = None,
    ds: Sequence[float] | None = None,
) -> list[CandidateStat]:
    cos = mean_cosines(cands.d, window)
    norms = cands.norms
    inside = set(window)
    return [
        CandidateStat(
            site=s.name,
            layer=s.layer,
            kind=s.kind,
            depth=s.depth,
            norm=float(norms[i]),
            mean_cosine=float(cos[i]),
            auroc=None if aurocs is None else float(aurocs[i]),
            cohens_d=None if ds is None else float(ds[i]),
            in_window=i in inside,
        )
        for i, s in enumerate(sites)
    ]
