"""The server's request rewriting, as a pure function of the JSON body (no server, no vLLM).

What it must guarantee: every steered request carries a prefix-cache salt that is the same for
the same steering and differs for any other steering, the client's own salt is kept, and an
angle can be picked by model name with a grammar whose mistakes are errors, never a silent
unsteered request.
"""

from __future__ import annotations

import pytest

from rotserve.http_steering import (
    MAX_SALT_LENGTH,
    ModelNameError,
    annotate_models,
    split_model_name,
    steer_request,
)
from rotserve.steering import RequestSteeringError, parse_request

PLANE = "0123456789ab"


@pytest.mark.parametrize(
    ("name", "base", "angle", "adaptive", "mode"),
    [
        ("org/model@150", "org/model", 150.0, False, "absolute"),
        ("org/model@150:adaptive", "org/model", 150.0, True, "absolute"),
        ("org/model@30:relative", "org/model", 30.0, False, "relative"),
        ("org/model@-30.5:relative:adaptive", "org/model", -30.5, True, "relative"),
        ("a@b@210", "a@b", 210.0, False, "absolute"),  # the last @ starts the suffix
    ],
)
def test_model_name_suffix_becomes_the_same_xargs_a_client_could_send(
    name, base, angle, adaptive, mode
):
    got_base, xargs = split_model_name(name)
    assert got_base == base
    steering = parse_request(xargs)
    assert (steering.angle, steering.adaptive, steering.mode) == (angle, adaptive, mode)


def test_plain_and_none_names():
    assert split_model_name("org/model") == ("org/model", None)  # no suffix: untouched
    assert split_model_name("org/model@none") == ("org/model", {})  # explicitly unsteered


@pytest.mark.parametrize(
    "name",
    [
        "m@",
        "@150",
        "m@ninety",
        "m@150:sideways",
        "m@150:adaptive:adaptive",
        "m@inf",
        "m@none:adaptive",
    ],
)
def test_a_malformed_suffix_is_an_error_naming_the_grammar(name):
    with pytest.raises(ModelNameError, match=r"MODEL@ANGLE\[:adaptive\]\[:relative\]"):
        split_model_name(name)


def test_every_steered_request_gets_a_salt_per_steering():
    def salt(xargs):
        return steer_request({"model": "m", "prompt": "p", "vllm_xargs": xargs}, PLANE).get(
            "cache_salt"
        )

    a = salt({"rotserve_angle": 0})
    assert a and a == salt({"rotserve_angle": 0.0})  # same steering: same salt, shared cache
    others = [
        salt({"rotserve_angle": 150}),
        salt({"rotserve_angle": 0, "rotserve_adaptive": True}),
        salt({"rotserve_angle": 0, "rotserve_mode": "relative"}),
    ]
    assert len({a, *others}) == 4
    assert PLANE in a
    assert salt({}) is None and salt({"other_plugin": 1}) is None  # unsteered: stock caching
    assert (
        steer_request({"model": "m", "vllm_xargs": {"rotserve_angle": 0}}, "other")["cache_salt"]
        != a
    )  # another plane never shares


def test_the_clients_salt_is_kept_and_joined():
    body = {"model": "m", "vllm_xargs": {"rotserve_angle": 90}, "cache_salt": "alice"}
    mine = steer_request(body, PLANE)["cache_salt"]
    theirs = steer_request({**body, "cache_salt": "bob"}, PLANE)["cache_salt"]
    assert mine.endswith("|alice") and theirs.endswith("|bob")
    unsteered = steer_request({"model": "m", "cache_salt": "alice"}, PLANE)
    assert unsteered["cache_salt"] == "alice"
    long = steer_request({**body, "cache_salt": "x" * 120}, PLANE)["cache_salt"]
    assert len(long) <= MAX_SALT_LENGTH and long != mine


def test_the_name_moves_into_xargs_and_the_model_loses_its_suffix():
    body = {"model": "m@150:adaptive", "prompt": "p", "vllm_xargs": {"other": 1}}
    out = steer_request(body, PLANE)
    assert out["model"] == "m" and out["prompt"] == "p"
    assert out["vllm_xargs"]["other"] == 1 and out["vllm_xargs"]["rotserve_angle"] == 150.0
    assert (
        out["cache_salt"]
        == steer_request(
            {"model": "m", "vllm_xargs": {"rotserve_angle": 150, "rotserve_adaptive": True}}, PLANE
        )["cache_salt"]
    )
    assert body["model"] == "m@150:adaptive"  # the caller's dict is not modified


def test_steering_given_twice_is_an_error():
    with pytest.raises(ModelNameError, match="give it one way"):
        steer_request({"model": "m@150", "vllm_xargs": {"rotserve_angle": 90}}, PLANE)
    with pytest.raises(RequestSteeringError, match="rotserve_angle must be a number"):
        steer_request({"model": "m", "vllm_xargs": {"rotserve_angle": "ninety"}}, PLANE)


def test_the_model_listing_says_how_to_pick_an_angle():
    listing = annotate_models({"object": "list", "data": [{"id": "org/model"}]})
    how = listing["data"][0]["rotserve"]["angle_by_name"]
    assert "org/model@150" in how and "org/model@none" in how


def test_plane_and_window_by_xargs_or_model_name_with_the_engines_catalog():
    """Several planes: the name form carries plane= and layers=, the salt names the resolved
    plane id and window, and an unknown plane is a 400 before vLLM sees it. (<0.1 s)"""
    from rotserve.steering import EngineSteering, PlaneCatalog

    settings = EngineSteering.from_dict({"planes": {"maxsim": "/a", "rand": "/b"}})
    catalog = PlaneCatalog.build(settings, [PLANE, "ba9876543210"], 24)
    named = steer_request({"model": "m@150:adaptive:plane=rand:layers=8,9,10"}, PLANE, catalog)
    sent = steer_request(
        {
            "model": "m",
            "vllm_xargs": {
                "rotserve_angle": 150,
                "rotserve_adaptive": True,
                "rotserve_plane": "ba9876543210",  # by plane id
                "rotserve_layers": "8:11",
            },
        },
        PLANE,
        catalog,
    )
    assert named["model"] == "m" and named["vllm_xargs"]["rotserve_plane"] == "rand"
    assert named["cache_salt"] == sent["cache_salt"]  # same steering, same salt
    assert "ba9876543210" in named["cache_salt"] and len(named["cache_salt"]) <= MAX_SALT_LENGTH
    default = steer_request({"model": "m@150:adaptive"}, PLANE, catalog)["cache_salt"]
    assert default == steer_request({"model": "m@150:adaptive"}, PLANE)["cache_salt"]
    assert default != named["cache_salt"]
    with pytest.raises(RequestSteeringError, match="unknown plane 'other'"):
        steer_request({"model": "m@150:plane=other"}, PLANE, catalog)
    with pytest.raises(RequestSteeringError, match="layer 30 is out of range"):
        steer_request({"model": "m@150:layers=30"}, PLANE, catalog)
    with pytest.raises(ModelNameError, match="expected"):
        split_model_name("m@150:planes=rand")
