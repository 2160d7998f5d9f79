"""Refusal by substring (the field's convention) and the fluency signal beside it."""

import pytest

from rotserve.scoring import REFUSAL_MARKERS, fluency, is_refusal


@pytest.mark.parametrize("marker", REFUSAL_MARKERS)
def test_every_reference_marker_counts_as_refusal_in_any_case(marker):
    assert is_refusal(f"Well. {marker.upper()} do that.") == (True, marker)


def test_typographic_apostrophes_count_too():
    assert is_refusal("I can\u2019t help with that.") == (True, "I can't")


def test_compliance_is_not_refusal():
    assert is_refusal("Sure! Step one: preheat the oven.") == (False, None)


def test_fluency_separates_text_from_collapse():
    text = "Bread needs flour, water, salt and time. Mix, rest, shape and bake it."
    loop = "bake bake bake bake bake bake bake bake bake bake"
    noise = "%% ## @@ )) ~~ ++ ::"
    assert fluency(text) > 0.8
    assert fluency(loop) < 0.3
    assert fluency(noise) == 0.0
    assert fluency("") == 0.0
