"""The plane artifact: one safetensors file, validated on load, never pickled."""

import json

import pytest
import torch
from safetensors.torch import save_file

from rotserve import Plane, PlaneError, PlaneMeta, load_plane
from rotserve.plane import ORTHONORMAL_TOL, orthonormal_plane

H = 48


def random_plane(seed=0):
    g = torch.Generator().manual_seed(seed)
    return orthonormal_plane(torch.randn(H, generator=g), torch.randn(H, generator=g))


def test_a_plane_round_trips_with_its_metadata(tmp_path):
    b1, b2 = random_plane()
    meta = PlaneMeta(
        model="toy", method={"select": "max_sim", "layer": 2}, candidates=[{"site": "resid_mid"}]
    )
    path = Plane(b1, b2, meta).save(tmp_path / "p.safetensors")
    loaded = load_plane(path, hidden_size=H)
    assert torch.equal(loaded.b1, b1) and torch.equal(loaded.b2, b2)
    assert loaded.meta.model == "toy" and loaded.meta.method["layer"] == 2
    assert loaded.meta.hidden_size == H and loaded.meta.rotserve_version and loaded.meta.created
    assert loaded.plane_id == Plane(b1, b2).plane_id
    assert not list(tmp_path.glob("*.tmp"))


def test_the_file_is_plain_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open

    b1, b2 = random_plane()
    path = Plane(b1, b2, PlaneMeta(model="m")).save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"b1", "b2"}
        assert json.loads(f.metadata()["rotserve"])["model"] == "m"
        assert f.get_tensor("b1").dtype == torch.float32


def test_wrong_hidden_size_is_refused_with_the_fix(tmp_path):
    path = Plane(*random_plane()).save(tmp_path / "p.safetensors")
    with pytest.raises(PlaneError, match=r"hidden size 48 but .* has 64.*rotserve extract"):
        load_plane(path, hidden_size=64)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda b1, b2: (b1, b2 * 2), "not orthonormal"),
        (lambda b1, b2: (b1, b1.clone()), "not orthonormal"),
        (
            lambda b1, b2: (b1.clone().index_fill_(0, torch.tensor([3]), float("nan")), b2),
            "NaN/inf",
        ),
        (lambda b1, b2: (b1, b2[:-1]), "must match"),
        (lambda b1, b2: (b1.reshape(6, 8), b2), "1-D"),
    ],
)
def test_a_corrupt_plane_file_fails_early_and_clearly(tmp_path, corrupt, message):
    b1, b2 = corrupt(*random_plane())
    path = tmp_path / "bad.safetensors"
    save_file({"b1": b1.contiguous(), "b2": b2.contiguous()}, str(path))
    with pytest.raises(PlaneError, match=message):
        load_plane(path)


def test_orthonormality_tolerance_is_the_stated_one():
    b1, b2 = random_plane()
    Plane(b1, b2 + b1 * ORTHONORMAL_TOL * 0.5)  # inside tolerance: accepted
    with pytest.raises(PlaneError, match="plane is not orthonormal"):
        Plane(b1, b2 + b1 * ORTHONORMAL_TOL * 3)


def test_pickled_and_missing_files_are_refused(tmp_path):
    npy = tmp_path / "direction.npy"
    npy.write_bytes(b"\x93NUMPY")
    with pytest.raises(PlaneError, match="only loads planes from .safetensors"):
        load_plane(npy)
    with pytest.raises(PlaneError, match="not found"):
        load_plane(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PlaneError, match="not a readable"):
        load_plane(junk)
    other = tmp_path / "other.safetensors"
    save_file({"direction": torch.ones(H)}, str(other))
    with pytest.raises(PlaneError, match="missing tensor"):
        load_plane(other)
