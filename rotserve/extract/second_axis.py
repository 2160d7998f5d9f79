"""The second axis b2: the `--second` methods, given b1.

Every method is one function with the signature `Build` (SecondAxisInputs -> SecondAxis),
registered in SECOND_METHODS by `@second_method`. The CLI's `--second` choices and help and
ExtractConfig.validate read the registry, so adding a method is one decorated function here.
`per-sample` streams every prompt once more into sklearn IncrementalPCA (`PerSamplePCA`), in
bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA, IncrementalPCA

from rotserve.extract.candidates import (
    HARMFUL,
    HARMLESS,
    MIN_NORM,
    Candidates,
    ExtractionError,
    random_unit,
    unit,
)
from rotserve.plane import orthonormal_plane


@dataclass
class SecondAxis:
    b1: torch.Tensor  # may differ from the first axis (last-pcs replaces the plane)
    b2: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    # When the method replaced the first axis's b1: what b1 became, appended to the summary's
    # reason. No site's candidate is then b1, so no row of the table is marked chosen.
    b1_replaced: str | None = None


# One more pass over every prompt, named for the progress bars: (activations [B, sites, H], label)
Batches = Callable[[str], Iterator[tuple[torch.Tensor, str]]]


@dataclass(frozen=True)
class SecondAxisInputs:
    """What a `--second` method may read."""

    b1: torch.Tensor  # the first axis, unit float32
    cands: Candidates
    window: Sequence[int]
    seed: int
    batches: Batches  # only per-sample uses it: the pass runs only when called


Build = Callable[[SecondAxisInputs], SecondAxis]


@dataclass(frozen=True)
class SecondMethod:
    """One `--second` method: its function and its lines in `rotserve extract --help`."""

    build: Build
    help: str


# In registration order, which is the order --help lists them.
SECOND_METHODS: dict[str, SecondMethod] = {}


def second_method(name: str, *, help: str) -> Callable[[Build], Build]:
    """Register the decorated function as `--second name`."""

    def register(build: Build) -> Build:
        SECOND_METHODS[name] = SecondMethod(build, help)
        return build

    return register


@second_method(
    "pca", help="PC1 of the stack of candidates (PCA centres them), Gram-Schmidt against b1"
)
def second_pca(x: SecondAxisInputs) -> SecondAxis:
    """PC1 of the stack of candidates in the window (PCA centres them), Gram-Schmidt vs b1.

    Centring removes what the candidates share (mostly b1 itself), so PC1 is the main way the
    refusal direction changes along depth: the second direction the model uses for it.
    """
    stack = _usable_rows(x.cands.d, x.window)
    if stack.shape[0] < 2:
        raise ExtractionError("--second pca needs at least 2 non-zero candidates; widen --layers")
    pca = PCA(n_components=1, svd_solver="full").fit(stack)
    pc1 = torch.from_numpy(pca.components_[0]).float()
    b1, b2 = orthonormal_plane(x.b1, pc1)
    return SecondAxis(
        b1,
        b2,
        {
            "explained_variance_ratio": float(pca.explained_variance_ratio_[0]),
            "pc1_cos_b1": float(unit(pc1) @ b1),
            "n_candidates": int(stack.shape[0]),
        },
    )


@second_method("random", help="a seeded random direction, Gram-Schmidt against b1 (control)")
def second_random(x: SecondAxisInputs) -> SecondAxis:
    """A seeded random direction, Gram-Schmidt vs b1: the control for b2."""
    b1, b2 = orthonormal_plane(x.b1, random_unit(x.b1.numel(), x.seed + 1))
    return SecondAxis(b1, b2, {"seed": x.seed + 1})


@second_method(
    "per-sample",
    help="every prompt at every window site is a candidate (its normalised activation\n"
    "minus the other class's normalised mean); b1 is projected out of each and the\n"
    "rows are streamed through sklearn IncrementalPCA (bounded memory; one extra\n"
    "pass over the prompts); b2 = PC1",
)
def second_per_sample(x: SecondAxisInputs) -> SecondAxis:
    """PC1 of every prompt's candidate beside b1 (see PerSamplePCA): one more pass over the
    prompts, streamed; memory is one chunk of rows x hidden floats whatever their number."""
    ps = PerSamplePCA(x.b1, x.cands.means, x.window, chunk_rows=max(256, 4 * len(x.window)))
    for acts, label in x.batches("per-sample"):
        ps.update(acts, label)
    return ps.finish()


@second_method(
    "last-pcs",
    help="replaces the plane by that of the last two meaningful principal components of\n"
    "the candidates (b1 = the direction of that plane closest to the --select\n"
    "choice); an experiment: the authors of angular steering report that this\n"
    "plane does not steer",
)
def last_pcs_plane(x: SecondAxisInputs) -> SecondAxis:
    """The plane of the last two meaningful principal components of the candidates.

    With n candidates, centring leaves at most n-1 components with variance; the "last two"
    are the two smallest of those. b1 is taken as the direction of that plane closest to
    x.b1 (the first-axis choice), so 0 degrees still points as refusal-ward as this plane
    allows; `ref_cos_in_plane` reports how much of the refusal direction it holds.
    """
    stack = _usable_rows(x.cands.d, x.window)
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
    ref = unit(x.b1.float())
    c1, c2 = float(ref @ u1), float(ref @ u2)
    in_plane = math.hypot(c1, c2)
    if in_plane < 1e-6:  # the reference is orthogonal to the plane: keep the PC order
        b1, b2 = u1, u2
    else:
        b1, b2 = orthonormal_plane(c1 * u1 + c2 * u2, -c2 * u1 + c1 * u2)
    return SecondAxis(
        b1,
        b2,
        {
            "components": [rank - 1, rank],  # 1-based PC numbers
            "explained_variance_ratio": [
                float(pca.explained_variance_ratio_[rank - 2]),
                float(pca.explained_variance_ratio_[rank - 1]),
            ],
            "ref_cos_in_plane": in_plane,  # |projection of the first-axis choice onto the plane|
            "n_candidates": n,
        },
        b1_replaced=(
            f"b1 = its projection onto the last-two-PC plane (cos {float(b1 @ x.b1):.3f})"
        ),
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
            {
                "rows": self.rows_seen,
                "rows_dropped": self.rows_dropped,
                "explained_variance_ratio": float(self.ipca.explained_variance_ratio_[0]),
                "n_components_fitted": int(self.ipca.n_components_),
                "chunk_rows": self.chunk_rows,
            },
        )
