"""The rotation, stated as properties. Each test is one sentence of the method's spec."""

import math

import pytest
import torch

from rotserve.plane import orthonormal_plane
from rotserve.rotation import (
    ablation_scale,
    addition_equivalent_angle,
    addition_turn,
    angle_table,
    angle_to,
    in_plane_angle,
    rotate,
    rotate_by,
    rotate_in_token_plane,
    rotate_to,
)

H = 64


@pytest.fixture
def plane():
    g = torch.Generator().manual_seed(0)
    b1, b2 = orthonormal_plane(torch.randn(H, generator=g), torch.randn(H, generator=g))
    return b1, b2, torch.stack([b1, b2])


@pytest.fixture
def h():
    return torch.randn(32, H, generator=torch.Generator().manual_seed(1)) * 3


def rms_norm(x):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("degrees", [0, 37, 90, 180, 270, 333])
def test_rotation_preserves_the_norm_of_every_token(plane, h, dtype, tol, degrees):
    b1, b2, _ = plane
    x = h.to(dtype)
    out = rotate_to(x, b1, b2, degrees)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().norm(dim=1), x.float().norm(dim=1), rtol=tol, atol=0)


def test_inactive_tokens_come_back_bit_identical(plane, h):
    _, _, basis = plane
    x = h.clone()
    x[3, 5] = -0.0
    table = angle_table([None if i % 2 else 45.0 for i in range(len(x))])
    out = rotate(x, basis, table)
    assert torch.equal(out[1::2], x[1::2])
    assert not torch.equal(out[0::2], x[0::2])
    bf = x.bfloat16()
    assert torch.equal(rotate(bf, basis, angle_table([None] * len(x))), bf)


def test_zero_degrees_aligns_the_in_plane_part_with_b1(plane, h):
    b1, b2, _ = plane
    out = rotate_to(h, b1, b2, 0)
    in_plane = torch.stack([out @ b1, out @ b2], 1)
    assert torch.all(in_plane[:, 0] > 0)
    torch.testing.assert_close(in_plane[:, 1], torch.zeros(len(h)), atol=1e-5, rtol=0)
    # the in-plane length is kept, only its direction changes
    torch.testing.assert_close(in_plane[:, 0], torch.stack([h @ b1, h @ b2], 1).norm(dim=1))


@pytest.mark.parametrize("degrees", [90, 270])
def test_ninety_and_two_seventy_remove_the_b1_component(plane, h, degrees):
    b1, b2, _ = plane
    out = rotate_to(h, b1, b2, degrees)
    torch.testing.assert_close(out @ b1, torch.zeros(len(h)), atol=1e-5, rtol=0)


def test_out_of_plane_part_is_untouched(plane, h):
    b1, b2, basis = plane
    out = rotate_to(h, b1, b2, 123)
    proj = lambda x: x - (x @ basis.t()) @ basis  # noqa: E731
    torch.testing.assert_close(proj(out), proj(h), atol=1e-5, rtol=0)


@pytest.mark.parametrize("degrees", [0, 45, 200])
def test_result_points_at_the_requested_angle(plane, h, degrees):
    b1, b2, _ = plane
    got = in_plane_angle(rotate_to(h, b1, b2, degrees), b1, b2)
    diff = torch.remainder(got - degrees + 180, 360) - 180
    assert diff.abs().max() < 1e-3


def test_adaptive_mode_leaves_tokens_not_leaning_toward_b1_untouched(plane, h):
    b1, b2, basis = plane
    out = rotate(h, basis, angle_table([200.0] * len(h), adaptive=True))
    leaning = (h @ b1) > 0
    assert 0 < leaning.sum() < len(h)  # the fixture has both kinds
    assert torch.equal(out[~leaning], h[~leaning])
    torch.testing.assert_close(out[leaning], rotate_to(h[leaning], b1, b2, 200))


def test_a_batch_mixing_angles_equals_each_token_rotated_alone(plane, h):
    b1, b2, basis = plane
    angles = [None, 0.0, 10.0, 95.5, 180.0, None, 271.0, 359.0] * 4
    adaptive = [i % 3 == 0 for i in range(len(h))]
    mixed = rotate(h, basis, angle_table(angles, adaptive=adaptive))
    for i, (a, ad) in enumerate(zip(angles, adaptive, strict=True)):
        alone = rotate(h[i : i + 1], basis, angle_table([a], adaptive=ad))
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-6, rtol=0)


def test_relative_mode_turns_by_the_angle_and_composes(plane, h):
    b1, b2, _ = plane
    before = in_plane_angle(h, b1, b2)
    after = in_plane_angle(rotate_by(h, b1, b2, 30), b1, b2)
    diff = torch.remainder(after - before - 30 + 180, 360) - 180
    assert diff.abs().max() < 1e-3
    twice = rotate_by(rotate_by(h, b1, b2, 30), b1, b2, 50)
    torch.testing.assert_close(twice, rotate_by(h, b1, b2, 80), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate_by(h, b1, b2, 0), h, atol=1e-6, rtol=0)


def test_numpy_scalars_and_nan_are_accepted_as_angles():
    np = pytest.importorskip("numpy")
    t = angle_table([np.float32(90), float("nan"), np.int64(180)])
    assert t[:, 2].tolist() == [1.0, 0.0, 1.0]
    assert t[1, 0] == 1 and t[1, 1] == 0  # identity row


# --- the seed claim: addition and ablation are rotations --------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 4.0, -3.0])
def test_activation_addition_then_rmsnorm_is_a_rotation_toward_b(plane, h, alpha):
    b, _, _ = plane
    added = rms_norm(h + alpha * b)
    theta = addition_equivalent_angle(h, b, alpha)
    rotated = rms_norm(rotate_in_token_plane(h, b, theta))
    torch.testing.assert_close(rotated, added, atol=1e-4, rtol=1e-4)
    # and the rotation is toward b for alpha > 0, away for alpha < 0
    turn = addition_turn(h, b, alpha)
    assert torch.all(turn > 0) if alpha > 0 else torch.all(turn < 0)


def test_the_angle_addition_turns_by_depends_on_the_token_norm(plane, h):
    b, _, _ = plane
    direction = h[:1] / h[:1].norm()
    tokens = torch.cat([direction * s for s in (0.5, 1.0, 4.0, 16.0)])  # same direction
    turns = addition_turn(tokens, b, alpha=2.0)
    assert torch.all(turns[:-1] > turns[1:])  # small tokens are turned much more
    assert float(turns[0] / turns[-1]) > 5


def test_directional_ablation_is_a_rotation_to_ninety_degrees_rescaled(plane, h):
    b, _, _ = plane
    ablated = h - (h @ b)[:, None] * b
    rotated = rotate_in_token_plane(h, b, torch.full((len(h),), math.pi / 2))
    torch.testing.assert_close(
        rotated * ablation_scale(h, b)[:, None], ablated, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(rms_norm(rotated), rms_norm(ablated), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(angle_to(ablated, b), torch.full((len(h),), math.pi / 2))
