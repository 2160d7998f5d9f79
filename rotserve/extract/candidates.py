"""The statistics behind a plane: candidates, their evidence, and the choice of b1 and b2.

Pure math on tensors that activations.py hands over; no model, no files. Everything that needs
to see every prompt is a streaming accumulator (`ClassSums`, `HeldOutScores`, `PerSamplePCA`)
fed one batch at a time, so memory is O(sites x hidden) whatever the number of prompts:

- `ClassSums`: running float64 sums of the normalised activations a/||a|| per class and site,
  enough for the class means and thus every candidate d_i.
- `HeldOutScores`: one float per held-out prompt and site (its cosine with that site's
  calibration candidate), i.e. O(prompts x sites) scalars, never vectors.
- `PerSamplePCA`: sklearn IncrementalPCA over the per-sample candidates, fed in bounded chunks.

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
from sklearn.decomposition import PCA, IncrementalPCA
from sklearn.metrics import roc_auc_score

from rotserve.plane import orthonormal_plane

HARMFUL, HARMLESS = "harmful", "harmless"
LABELS = (HARMFUL, HARMLESS)
SITE_KINDS = ("resid_mid", "resid_post")
SELECT_METHODS = ("max_sim", "max_norm", "mean", "separability")
SECOND_METHODS = ("pca", "random", "per-sample", "last-pcs")

# Two AUROCs closer than this are a tie, broken by Cohen's d. On a model that has learned the
# concept many sites separate the held-out prompts perfectly (AUROC = 1), and then the size of
# the gap between the classes is what tells the sites apart.
AUROC_TIE = 1e-6
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


# --- First axis -------------------------------------------------------------------------------


@dataclass
class FirstAxis:
    b1: torch.Tensor  # unit, float32
    index: int | None  # chosen site; None when b1 is not one site's candidate (mean, random)
    method: str
    reason: str  # one line for the summary


def select_first_axis(
    method: str,
    table: Sequence[CandidateStat],
    cands: Candidates,
    window: Sequence[int],
) -> FirstAxis:
    """b1 by statistics alone: no generation.

    max_sim       the candidate with the highest mean cosine to the others (the choice of the
                  original angular steering method).
    max_norm      the candidate with the longest r_i, excluding the final site (the last
                  layer's output feeds only the unembedding: its difference is about the
                  next token, not the concept).
    mean          the normalised mean of all candidates in the window.
    separability  the site whose held-out projections separate the classes best: highest AUROC,
                  ties (within AUROC_TIE) broken by the larger Cohen's d. b1 is that site's
                  candidate from all prompts.
    """
    usable = [i for i in window if float(cands.norms[i]) > MIN_NORM]
    if not usable:
        raise ExtractionError(
            "every candidate in the window is zero: the harmful and harmless activations have "
            "the same mean there; check the prompt files or widen --layers"
        )
    if method == "max_sim":
        i = max(usable, key=lambda j: table[j].mean_cosine)
        return FirstAxis(cands.d[i], i, method, f"mean cosine {table[i].mean_cosine:.3f}")
    if method == "max_norm":
        last = len(table) - 1
        pool = [j for j in usable if j != last] or usable
        i = max(pool, key=lambda j: table[j].norm)
        return FirstAxis(cands.d[i], i, method, f"||r|| {table[i].norm:.3f}")
    if method == "mean":
        b1 = unit(cands.d[usable].double().mean(0)).float()
        if float(b1.norm()) < 0.5:
            raise ExtractionError(
                "the candidates cancel out: their mean is zero; use --select max_sim"
            )
        return FirstAxis(b1, None, method, f"mean of {len(usable)} candidates")
    if method == "separability":
        if any(table[j].auroc is None or math.isnan(table[j].auroc) for j in usable):
            raise ExtractionError(
                "--select separability needs held-out prompts: set --holdout above 0 "
                "(each class needs at least 2 prompts)"
            )
        i = max(usable, key=lambda j: _separability_key(table[j]))
        return FirstAxis(
            cands.d[i],
            i,
            method,
            f"held-out AUROC {table[i].auroc:.3f}, Cohen's d {_fmt(table[i].cohens_d)}",
        )
    raise ExtractionError(f"unknown --select {method!r}; choose from {', '.join(SELECT_METHODS)}")


def _separability_key(row: CandidateStat) -> tuple[float, float]:
    # Rounding AUROC to the tie tolerance makes near-equal AUROCs compare equal, so the tuple
    # order falls through to Cohen's d.
    d = row.cohens_d if row.cohens_d is not None and not math.isnan(row.cohens_d) else -math.inf
    return (round(float(row.auroc or 0.0) / AUROC_TIE) * AUROC_TIE, d)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def random_unit(hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return unit(torch.randn(hidden, generator=g, dtype=torch.float64)).float()


# --- Second axis ------------------------------------------------------------------------------


@dataclass
class SecondAxis:
    b1: torch.Tensor  # may differ from the first axis (last-pcs replaces the plane)
    b2: torch.Tensor
    method: str
    info: dict[str, Any] = field(default_factory=dict)


def second_pca(d: torch.Tensor, window: Sequence[int], b1: torch.Tensor) -> SecondAxis:
    """PC1 of the stack of candidates in the window (PCA centres them), Gram-Schmidt vs b1.

    Centring removes what the candidates share (mostly b1 itself), so PC1 is the main way the
    refusal direction changes along depth: the second direction the model uses for it.
    """
    stack = _usable_rows(d, window)
    if stack.shape[0] < 2:
        raise ExtractionError("--second pca needs at least 2 non-zero candidates; widen --layers")
    pca = PCA(n_components=1, svd_solver="full").fit(stack)
    pc1 = torch.from_numpy(pca.components_[0]).float()
    b1, b2 = orthonormal_plane(b1, pc1)
    return SecondAxis(
        b1,
        b2,
        "pca",
        {
            "explained_variance_ratio": float(pca.explained_variance_ratio_[0]),
            "pc1_cos_b1": float(unit(pc1) @ b1),
            "n_candidates": int(stack.shape[0]),
        },
    )


def second_random(b1: torch.Tensor, seed: int) -> SecondAxis:
    """A seeded random direction, Gram-Schmidt vs b1: the control for b2."""
    b1, b2 = orthonormal_plane(b1, random_unit(b1.numel(), seed + 1))
    return SecondAxis(b1, b2, "random", {"seed": seed + 1})


def last_pcs_plane(d: torch.Tensor, window: Sequence[int], reference: torch.Tensor) -> SecondAxis:
    """The plane of the last two meaningful principal components of the candidates.

    With n candidates, centring leaves at most n-1 components with variance; the "last two"
    are the two smallest of those. b1 is taken as the direction of that plane closest to
    `reference` (the first-axis choice), so 0 degrees still points as refusal-ward as this
    plane allows; `ref_cos_in_plane` reports how much of the refusal direction it holds.
    """
    stack = _usable_rows(d, window)
    n = stack.shape[0]
    if n < 3:
        raise ExtractionError(
            f"--second last-pcs needs at least 3 non-zero candidates, the window has {n}; "
            "widen --layers"
        )
    pca = PCA(svd_solver="full").fit(stack)
    var = pca.explained_variance_
    rank = int((var > var[0] * 1e-10).sum())
    if rank < 2:
        raise ExtractionError("the candidates vary along one direction only: no last-two-PC plane")
    p1 = torch.from_numpy(pca.components_[rank - 2]).float()
    p2 = torch.from_numpy(pca.components_[rank - 1]).float()
    u1, u2 = orthonormal_plane(p1, p2)
    ref = unit(reference.float())
    c1, c2 = float(ref @ u1), float(ref @ u2)
    in_plane = math.hypot(c1, c2)
    if in_plane < 1e-6:  # the reference is orthogonal to the plane: keep the PC order
        b1, b2 = u1, u2
    else:
        b1, b2 = orthonormal_plane(c1 * u1 + c2 * u2, -c2 * u1 + c1 * u2)
    return SecondAxis(
        b1,
        b2,
        "last-pcs",
        {
            "components": [rank - 1, rank],  # 1-based PC numbers
            "explained_variance_ratio": [
                float(pca.explained_variance_ratio_[rank - 2]),
                float(pca.explained_variance_ratio_[rank - 1]),
            ],
            "ref_cos_in_plane": in_plane,  # |projection of the first-axis choice onto the plane|
            "n_candidates": n,
        },
    )


def _usable_rows(d: torch.Tensor, window: Sequence[int]) -> np.ndarray:
    rows = d[list(window)].double()
    return rows[rows.norm(dim=1) > MIN_NORM].numpy()


class PerSamplePCA:
    """b2 from every prompt instead of class means, in bounded memory.

    Each prompt at each window site gives a candidate: its normalised activation minus the
    OTHER class's normalised mean (so harmful ones point harmful-ward, harmless ones away).
    Those vectors share b1 by construction, so it is projected out of each one first; what is
    left is fed to sklearn IncrementalPCA in chunks of `chunk_rows` rows. Memory: the chunk
    buffer plus `n_components` x hidden, whatever the number of prompts. b2 = PC1 of what b1
    does not explain, orthogonal to b1 by construction (Gram-Schmidt still run for rounding).
    """

    def __init__(
        self,
        b1: torch.Tensor,
        means: dict[str, torch.Tensor],
        window: Sequence[int],
        n_components: int = 4,
        chunk_rows: int = 256,
    ) -> None:
        self.b1 = unit(b1.double())
        self.window = list(window)
        self.other = {
            HARMFUL: means[HARMLESS][self.window].double(),
            HARMLESS: means[HARMFUL][self.window].double(),
        }
        self.n_components = n_components
        self.chunk_rows = max(chunk_rows, n_components)
        self.ipca: IncrementalPCA | None = None
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.rows_seen = 0
        self.rows_dropped = 0

    def update(self, acts: torch.Tensor, label: str) -> None:
        x = unit(acts[:, self.window].double()) - self.other[label]  # [B, W, H]
        x = x - (x @ self.b1)[..., None] * self.b1
        rows = x.reshape(-1, x.shape[-1]).numpy()
        self._buffer.append(rows)
        self._buffered += rows.shape[0]
        self.rows_seen += rows.shape[0]
        if self._buffered >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        chunk = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        if self.ipca is None:
            # The first chunk fixes the number of components (IncrementalPCA needs at least
            # that many rows in every chunk; a tiny run simply fits fewer).
            k = min(self.n_components, chunk.shape[0], chunk.shape[1])
            self.ipca = IncrementalPCA(n_components=k)
        if chunk.shape[0] < self.ipca.n_components:
            # Only a final remainder can be this small (every other chunk has chunk_rows rows);
            # it cannot be fitted, so it is counted and reported instead of silently lost.
            self.rows_dropped += chunk.shape[0]
            return
        self.ipca.partial_fit(chunk)

    def finish(self) -> SecondAxis:
        self._flush()
        if self.ipca is None or self.rows_seen - self.rows_dropped < 2:
            raise ExtractionError("--second per-sample needs at least 2 prompts in total")
        pc1 = torch.from_numpy(self.ipca.components_[0]).float()
        b1, b2 = orthonormal_plane(self.b1.float(), pc1)
        return SecondAxis(
            b1,
            b2,
            "per-sample",
            {
                "rows": self.rows_seen,
                "rows_dropped": self.rows_dropped,
                "explained_variance_ratio": float(self.ipca.explained_variance_ratio_[0]),
                "n_components_fitted": int(self.ipca.n_components_),
                "chunk_rows": self.chunk_rows,
            },
        )
