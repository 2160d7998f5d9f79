"""The b1 and b2 rules as specifications, on hand-built candidates (no model, hidden size 6).

Each test builds data on which the rules disagree, asserts the answer the rule under test must
give, and asserts that the other rules give something else on the same data: so a rule that
quietly turns into another one (or into its opposite, or into noise) fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from rotserve.extract.candidates import (
    HARMFUL,
    HARMLESS,
    Candidates,
    CandidateStat,
    all_sites,
    candidate_table,
)
from rotserve.extract.first_axis import SELECT_RULES, FirstAxis, select_first_axis
from rotserve.extract.second_axis import (
    PerSamplePCA,
    SecondAxisInputs,
    last_pcs_plane,
    second_pca,
    second_random,
)

H = 6  # hidden size


def e(i: int) -> torch.Tensor:
    """The i-th basis vector of the hidden space."""
    v = torch.zeros(H)
    v[i] = 1.0
    return v


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def candidates(directions: list[torch.Tensor], norms: list[float]) -> Candidates:
    """Candidates with d_i = unit(directions[i]) and ||r_i|| = norms[i]."""
    d = torch.stack([unit(v) for v in directions])
    r = d * torch.tensor(norms)[:, None]
    return Candidates(r=r, d=d, means={})


def b2_inputs(
    b1: torch.Tensor, d: torch.Tensor | None = None, window: list[int] | None = None
) -> SecondAxisInputs:
    """What a --second method reads, from hand-built candidates d (no prompts to pass over)."""
    d = torch.zeros(0, H) if d is None else d

    def no_pass(name: str):
        raise AssertionError(f"{name}: this test has no prompts to pass over")

    return SecondAxisInputs(b1, Candidates(r=d, d=d, means={}), window or [], 0, no_pass)


def all_picks(
    table: list[CandidateStat], cands: Candidates, window: list[int]
) -> dict[str, FirstAxis]:
    return {m: select_first_axis(m, table, cands, window) for m in SELECT_RULES}


def assert_same_direction(a: torch.Tensor, b: torch.Tensor, up_to_sign: bool = False) -> None:
    cos = float(unit(a.double()) @ unit(b.double()))
    assert (abs(cos) if up_to_sign else cos) > 1 - 1e-5, f"cos {cos:.6f}"


def assert_other_direction(a: torch.Tensor, b: torch.Tensor) -> None:
    cos = float(unit(a.double()) @ unit(b.double()))
    assert abs(cos) < 0.95, f"the directions agree (cos {cos:.6f}): the data does not discriminate"


# --- First axis --------------------------------------------------------------------------------
#
# Three layers, six sites (index 5, L2.resid_post, is the final site). Sites 1-3 are a cluster
# around e0 with site 2 at its centre; sites 0 and 4 point elsewhere; the final site has the
# longest difference of means. The held-out statistics favour site 3.
SITES = all_sites(3)
WINDOW = list(range(6))
DIRECTIONS = [
    e(3),  # 0: an outlier, short
    e(0) + 0.4 * e(1),  # 1: cluster
    e(0),  # 2: the centre of the cluster: the most similar to the others
    e(0) - 0.4 * e(1),  # 3: cluster, the best separating site
    e(2),  # 4: an outlier, the longest r before the final site
    e(2) + e(3),  # 5: the final site, the longest r of all
]
NORMS = [0.5, 1.0, 0.8, 1.1, 2.0, 3.0]
# Site 1 has the highest AUROC, but only by 1e-9, within AUROC_TIE of site 3: a tie, which
# site 3's larger Cohen's d wins. Site 5 has the largest Cohen's d but a clearly lower AUROC.
AUROCS = [0.80, 1.0, 0.90, 1.0 - 1e-9, 0.70, 0.95]
COHENS_D = [1.0, 2.0, 3.0, 6.0, 1.0, 9.0]


@pytest.fixture
def evidence() -> tuple[list[CandidateStat], Candidates]:
    cands = candidates(DIRECTIONS, NORMS)
    return candidate_table(SITES, cands, WINDOW, AUROCS, COHENS_D), cands


def test_max_sim_picks_the_candidate_most_similar_to_the_others(evidence):
    """max_sim: b1 is the candidate with the highest mean cosine to the window's candidates."""
    table, cands = evidence
    picks = all_picks(table, cands, WINDOW)
    cos = [row.mean_cosine for row in table]
    assert max(range(6), key=cos.__getitem__) == 2  # the construction, checked
    assert picks["max_sim"].index == 2
    assert torch.equal(picks["max_sim"].b1, cands.d[2])
    # The least similar candidates are the outliers: the opposite rule lands there.
    assert min(range(6), key=cos.__getitem__) in (0, 4)
    assert {picks[m].index for m in ("max_norm", "mean", "separability")}.isdisjoint({2})


def test_max_norm_picks_the_longest_difference_of_means_except_the_final_site(evidence):
    """max_norm: b1 is the candidate with the largest ||r||, the final site excluded (the last
    layer's output feeds only the unembedding: its difference is about the next token)."""
    table, cands = evidence
    picks = all_picks(table, cands, WINDOW)
    assert max(range(6), key=lambda i: table[i].norm) == 5  # the final site is the longest
    assert picks["max_norm"].index == 4
    assert torch.equal(picks["max_norm"].b1, cands.d[4])
    assert {picks[m].index for m in ("max_sim", "mean", "separability")}.isdisjoint({4})


def test_max_norm_takes_the_final_site_when_the_window_holds_nothing_else():
    """With only the final site in the window, max_norm has nothing to exclude it for."""
    cands = candidates(DIRECTIONS, NORMS)
    table = candidate_table(SITES, cands, [5])
    assert select_first_axis("max_norm", table, cands, [5]).index == 5


def test_mean_is_the_normalised_mean_of_the_unit_candidates_not_a_site():
    """mean: b1 = unit(mean of d_i over the window). Unit candidates, so ||r|| weighs nothing,
    and no site is chosen."""
    # Four orthogonal candidates of very different lengths: the mean of the unit vectors is
    # (1, 1, 1, 1, 0, 0)/2; a mean weighted by ||r|| would lean toward e2.
    cands = candidates([e(0), e(1), e(2), e(3)], [1.0, 2.0, 3.0, 0.5])
    window = [0, 1, 2, 3]
    table = candidate_table(all_sites(2), cands, window, [0.6, 0.7, 0.8, 0.9], [1.0] * 4)
    picks = all_picks(table, cands, window)
    assert picks["mean"].index is None
    assert_same_direction(picks["mean"].b1, torch.tensor([0.5, 0.5, 0.5, 0.5, 0, 0]))
    assert_other_direction(picks["mean"].b1, unit(cands.r.sum(0)))  # not ||r||-weighted
    for m in ("max_sim", "max_norm", "separability"):
        assert picks[m].index is not None
        assert_other_direction(picks["mean"].b1, picks[m].b1)


def test_mean_of_the_mixed_evidence_is_none_of_the_candidates(evidence):
    table, cands = evidence
    b1 = select_first_axis("mean", table, cands, WINDOW).b1
    assert_same_direction(b1, cands.d.mean(0))
    for i in WINDOW:
        assert_other_direction(b1, cands.d[i])


def test_separability_picks_the_best_held_out_auroc_ties_broken_by_cohens_d(evidence):
    """separability: the site with the highest held-out AUROC; AUROCs within AUROC_TIE are a
    tie, broken by the larger Cohen's d. b1 is that site's candidate."""
    table, cands = evidence
    picks = all_picks(table, cands, WINDOW)
    assert picks["separability"].index == 3
    assert torch.equal(picks["separability"].b1, cands.d[3])
    assert "AUROC 1.000" in picks["separability"].reason
    # Not the worst AUROC, not the strictly highest one (1 beats 3 by 1e-9, a tie), not the
    # largest Cohen's d alone (5), and not what the other rules pick.
    assert min(range(6), key=lambda i: AUROCS[i]) == 4
    assert {picks[m].index for m in ("max_sim", "max_norm", "mean")}.isdisjoint({3})


def test_every_rule_chooses_inside_the_window(evidence):
    """Outside the --layers window a candidate is reported but never chosen."""
    table, cands = evidence
    window = [0, 1, 4, 5]  # layers 0 and 2: the centre (2) and the best AUROC (3) are out
    table = candidate_table(SITES, cands, window, AUROCS, COHENS_D)
    picks = all_picks(table, cands, window)
    assert {m: p.index for m, p in picks.items()} == {
        "max_sim": 5,  # e2 + e3 is the one close to both outliers
        "max_norm": 4,
        "mean": None,
        "separability": 1,
    }
    assert_same_direction(picks["mean"].b1, cands.d[window].mean(0))


# --- Second axis --------------------------------------------------------------------------------


def pca_candidates() -> tuple[torch.Tensor, list[int]]:
    """Unit candidates that fan out from e0 along e1 (the dominant spread), with a small
    spread along e2 that is uncorrelated with it: PC1 of the centred stack is exactly e1."""
    a = [-0.6, -0.2, 0.2, 0.6]
    c = [0.05, -0.05, -0.05, 0.05]  # even in a: no covariance with the e1 component
    d = torch.stack([unit(e(0) + ai * e(1) + ci * e(2)) for ai, ci in zip(a, c, strict=True)])
    return d, list(range(4))


def test_pca_b2_is_the_main_spread_of_the_candidates_orthogonalised_against_b1():
    """pca: b2 = PC1 of the centred candidates, Gram-Schmidt against b1."""
    d, window = pca_candidates()
    b1 = unit(e(0) + 0.5 * e(1))  # not orthogonal to PC1, so Gram-Schmidt has work to do
    second = second_pca(b2_inputs(b1, d, window))
    assert torch.allclose(second.b1, b1)
    # e1 minus its component along b1 = (-0.4, 0.8, 0, ...) ~ (-1, 2)/sqrt(5).
    expected = (-e(0) + 2 * e(1)) / math.sqrt(5)
    assert_same_direction(second.b2, expected, up_to_sign=True)
    assert abs(float(second.b1 @ second.b2)) < 1e-6
    assert second.info["explained_variance_ratio"] > 0.9
    # A random b2 is another direction (the last-pcs test shows pca and last-pcs disagree).
    assert_other_direction(second_random(b2_inputs(b1)).b2, expected)


def last_pcs_candidates() -> tuple[torch.Tensor, list[int]]:
    """Five candidates e0 + offsets along e1..e4 with spreads 8, 4, 2, 1 (orthogonal, zero-mean
    Helmert columns): the centred stack has rank 4 and its PCs are e1, e2, e3, e4 in order."""
    helmert = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],
            [-1.0, 1.0, 1.0, 1.0],
            [0.0, -2.0, 1.0, 1.0],
            [0.0, 0.0, -3.0, 1.0],
            [0.0, 0.0, 0.0, -4.0],
        ]
    )
    offsets = helmert / helmert.norm(dim=0) * torch.tensor([8.0, 4.0, 2.0, 1.0])
    d = torch.zeros(5, H)
    d[:, 0] = 1.0
    d[:, 1:5] = offsets
    # The rules take the candidates as given, so rows that are not unit keep the PCs exact.
    return d, list(range(5))


def test_last_pcs_plane_is_the_last_two_meaningful_pcs_with_b1_toward_the_first_choice():
    """last-pcs: the plane of the two smallest principal components with variance (here e3 and
    e4); b1 is the direction of that plane closest to the first-axis choice, b2 is orthogonal
    to it inside the plane."""
    d, window = last_pcs_candidates()
    reference = unit(e(0) + e(1) + e(3) + 2 * e(4))  # its projection on span(e3, e4): (1, 2)
    second = last_pcs_plane(b2_inputs(reference, d, window))
    assert second.info["components"] == [3, 4]
    assert_same_direction(second.b1, e(3) + 2 * e(4))  # with its sign: toward the reference
    assert_same_direction(second.b2, -2 * e(3) + e(4), up_to_sign=True)
    assert abs(float(second.b1 @ second.b2)) < 1e-6
    assert second.info["ref_cos_in_plane"] == pytest.approx(math.sqrt(5) / math.sqrt(7), 1e-5)
    # pca on the same candidates takes the main spread instead: e1 (orthogonalised vs b1).
    assert_same_direction(second_pca(b2_inputs(second.b1, d, window)).b2, e(1), up_to_sign=True)


def per_sample_data() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two window sites. Harmful activations lean to +e0, harmless to -e0 (so b1 = e0); each
    prompt also has its own offset s along e3. Per prompt the candidate is ~ +-e0 (the class
    separation, the largest spread) plus s e3; with e0 projected out, e3 is what is left."""
    s = torch.tensor([-0.4, -0.25, -0.1, 0.1, 0.25, 0.4])  # symmetric: exact covariances
    acts = {
        label: torch.stack(
            [torch.stack([e(1) + sign * e(0) + si * e(3)] * 2) for si in s]
        )  # [prompts, 2 sites, H]
        for label, sign in ((HARMFUL, 1.0), (HARMLESS, -1.0))
    }
    means = {
        HARMFUL: torch.stack([unit(e(1) + e(0))] * 2),
        HARMLESS: torch.stack([unit(e(1) - e(0))] * 2),
    }
    return acts, means


def test_per_sample_b2_is_the_main_spread_of_the_per_prompt_candidates_beside_b1():
    """per-sample: each prompt's candidate is its unit activation minus the other class's unit
    mean; b1 is projected out of each; b2 = PC1 of what is left (orthogonal to b1)."""
    acts, means = per_sample_data()
    b1 = e(0)
    ps = PerSamplePCA(b1, means, [0, 1], n_components=2, chunk_rows=4)
    for label in (HARMFUL, HARMLESS):
        for start in range(0, 6, 4):  # uneven batches, several chunks
            ps.update(acts[label][start : start + 4], label)
    second = ps.finish()
    assert torch.allclose(second.b1, b1)
    assert_same_direction(second.b2, e(3), up_to_sign=True)
    assert abs(float(second.b1 @ second.b2)) < 1e-6
    assert second.info["rows"] == 2 * 6 * 2 and second.info["rows_dropped"] == 0
    assert_other_direction(second_random(b2_inputs(b1)).b2, e(3))


def test_per_sample_candidates_are_measured_from_the_other_class_mean():
    """per-sample: a prompt's candidate is its unit activation minus the OTHER class's unit
    mean, so harmful candidates point harmful-ward and harmless ones away. The part of the class
    separation that b1 misses (here along e4) is then the main spread beside b1, and b2."""
    s = torch.tensor([-0.4, -0.25, -0.1, 0.1, 0.25, 0.4])
    acts = {
        label: torch.stack(
            [torch.stack([e(1) + sign * (e(0) + 0.5 * e(4)) + si * e(3)] * 2) for si in s]
        )
        for label, sign in ((HARMFUL, 1.0), (HARMLESS, -1.0))
    }
    means = {label: unit_rows(unit_rows(a).mean(0)) for label, a in acts.items()}
    b1 = e(0)  # e.g. another site's candidate: it misses the e4 part of the separation here
    ps = PerSamplePCA(b1, means, [0, 1], n_components=2, chunk_rows=4)
    for label in (HARMFUL, HARMLESS):
        ps.update(acts[label], label)
    second = ps.finish()
    assert_same_direction(second.b2, e(4), up_to_sign=True)
    assert abs(float(second.b1 @ second.b2)) < 1e-6
    # Measured from its own class's mean instead, each candidate would keep only the
    # per-prompt offsets (e3): the rule is what makes b2 see the separation.
    assert_other_direction(second.b2, e(3))
