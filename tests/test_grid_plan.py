"""The plan is pure and deterministic: every unit in exactly one shard, ids stable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rotserve.grid.config import PromptSet, evenly_spaced
from rotserve.grid.plan import Condition, conditions, make_plan
from rotserve.prompts import Prompt


def prompt_sets(n_harm: int = 5, n_safe: int = 3) -> tuple[PromptSet, ...]:
    def ps(label: str, n: int) -> PromptSet:
        prompts = tuple(Prompt(id=f"{label}-{i}", instruction=f"{label} {i}") for i in range(n))
        return PromptSet(label=label, path=Path(f"/{label}.jsonl"), sha256="0", prompts=prompts)

    return (ps("harmful", n_harm), ps("harmless", n_safe))


def test_conditions_baseline_first_and_masks():
    conds = conditions(evenly_spaced(4), (False, True), baseline=True)
    assert conds[0] == Condition(None, False)
    assert len(conds) == 1 + 4 * 2
    assert conds[1:5] == tuple(
        Condition(a, False, "default", "all") for a in (0.0, 90.0, 180.0, 270.0)
    )
    assert all(c.adaptive for c in conds[5:])
    assert conditions([0.0], (False,), baseline=False) == (Condition(0.0, False, "default", "all"),)
    assert Condition(None, False).label == "baseline"


def test_every_unit_in_exactly_one_shard():
    sets = prompt_sets()
    conds = conditions(evenly_spaced(6), (False, True), baseline=True)
    plan = make_plan(sets, conds, shard_size=7, samples=2)
    keys = Counter(u.key() for s in plan.shards for u in s.units)
    assert len(keys) == 8 * len(conds) and set(keys.values()) == {1}
    assert plan.n_units == 8 * 13 and plan.n_rows == 2 * plan.n_units
    assert [len(s.units) for s in plan.shards[:-1]] == [7] * (len(plan.shards) - 1)
    assert 1 <= len(plan.shards[-1].units) <= 7
    assert [s.shard_id for s in plan.shards] == [f"{i:05d}" for i in range(len(plan.shards))]
    assert plan.shard("00003") is plan.shards[3]


def test_shards_mix_angles():
    plan = make_plan(prompt_sets(), conditions(evenly_spaced(36), (False,), True), shard_size=64)
    assert len({u.condition.angle for u in plan.shards[0].units}) >= 30


def test_plan_is_deterministic_and_fingerprinted():
    conds = conditions(evenly_spaced(4), (False,), True)
    a = make_plan(prompt_sets(), conds, shard_size=5)
    b = make_plan(prompt_sets(), conds, shard_size=5)
    assert a == b and a.fingerprint == b.fingerprint
    assert make_plan(prompt_sets(), conds, shard_size=6).fingerprint != a.fingerprint
    assert make_plan(prompt_sets(6), conds, shard_size=5).fingerprint != a.fingerprint


def test_a_single_plane_run_is_named_as_the_steering_vocabulary_names_its_plane():
    """The run directory spells the default plane's name itself (its readers need no torch);
    it must be the name an engine gives its one plane, or run ids and labels would drift."""
    from rotserve import rundir, steering

    assert rundir.DEFAULT_PLANE == steering.DEFAULT_PLANE
    assert rundir.is_default_setting(steering.DEFAULT_PLANE, "all")
    assert rundir.is_default_setting(None, None)  # the baseline
    assert not rundir.is_default_setting(steering.DEFAULT_PLANE, "0:2")
    assert not rundir.is_default_setting("rand", "all")
