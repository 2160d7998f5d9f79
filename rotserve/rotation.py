"""Angular steering: rotate activations inside a 2D plane. Pure torch, no I/O.

With an orthonormal basis b1, b2 of the plane, P = b1 b1ᵀ + b2 b2ᵀ and a target angle θ:

    v_θ = cos θ · b1 + sin θ · b2
    h'  = h + m(h) · (‖P h‖ · v_θ − P h)                      (absolute: "rotate TO θ")

The in-plane part of h is replaced by a vector of the same length pointing at θ from b1;
the out-of-plane part is untouched, so ‖h'‖ = ‖h‖. 0° points toward refusal (b1), 90° and
270° remove the b1 component, 180° flips it. "No steering" is its own value (active = 0),
never 0°.

The relative mode ("rotate BY θ") turns the in-plane part by θ instead of setting its angle:
h' = h − P h + R_θ P h.

Every function works on a flat batch of tokens [N, H] with one angle per token, because
that is how vLLM lays out a continuous batch: many requests, prefill and decode mixed.
The math is unconditional (masks are multiplications, not branches) so it traces and
compiles once and runs under CUDA graphs.
"""

from __future__ import annotations

import math

import torch

# Columns of the per-token steering table [N, 5] float32, one row per token:
#   COS, SIN   the target angle θ (absolute mode) or the turn (relative mode);
#   ACTIVE     1 to steer this token, 0 to leave it bit-identical;
#   ADAPTIVE   1 to steer only where h·b1 > 0 (the token already leans toward refusal);
#   RELATIVE   1 for "rotate by θ", 0 for "rotate to θ".
COS, SIN, ACTIVE, ADAPTIVE, RELATIVE = range(5)
TABLE_WIDTH = 5


def angle_table(
    degrees: list[float | None] | torch.Tensor,
    adaptive: bool | list[bool] = False,
    relative: bool | list[bool] = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build the [N, 5] float32 table (cos, sin, active, adaptive, relative) from degrees.

    None or NaN entries become inactive rows (cos=1, sin=0, active=0): identity.
    """
    if isinstance(degrees, torch.Tensor):
        deg = degrees.to(torch.float64).flatten()
    else:
        deg = torch.tensor(
            [math.nan if d is None else float(d) for d in degrees], dtype=torch.float64
        )
    n = deg.numel()
    active = ~torch.isnan(deg)
    rad = torch.deg2rad(torch.where(active, deg, torch.zeros_like(deg)))
    table = torch.zeros(n, TABLE_WIDTH, dtype=torch.float64)
    table[:, COS] = torch.cos(rad)
    table[:, SIN] = torch.sin(rad)
    table[:, ACTIVE] = active.to(torch.float64)
    table[:, ADAPTIVE] = _per_token_flag(adaptive, n)
    table[:, RELATIVE] = _per_token_flag(relative, n)
    return table.to(device=device, dtype=torch.float32)


def _per_token_flag(flag: bool | list[bool], n: int) -> torch.Tensor:
    if isinstance(flag, bool):
        return torch.full((n,), float(flag), dtype=torch.float64)
    if len(flag) != n:
        raise ValueError(f"got {len(flag)} flags for {n} tokens; give one per token or a bool")
    return torch.tensor([float(bool(f)) for f in flag], dtype=torch.float64)


def rotate(
    h: torch.Tensor, basis: torch.Tensor, table: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate each token of h inside the plane spanned by basis, per its row of table.

    h:      [N, H] activations, any float dtype (computed in float32, returned in h.dtype).
    basis:  [2, H] float32, rows b1 and b2, orthonormal.
    table:  [N, >=5] float32 per-token (cos, sin, active, adaptive, relative), see angle_table.
    gate:   optional [N] float32, 1 to steer the token at this site, 0 to leave it (a
            request's layer window: the same table serves every site, the gate says which).

    Written as broadcasts and row sums rather than matmuls with a [H, 2] matrix: torch.compile
    (vLLM compiles the model) fuses this form with the preceding RMSNorm into one kernel,
    while the matmul form costs two GEMM calls plus two elementwise passes per site.
    Inactive and masked-out tokens come back bit-identical (a select, not an add of zero,
    so -0.0 and NaN survive too).

    The per-token scalars are stacked into one [N, 3] tensor on purpose: used three times, it
    is materialised once per token by Inductor. Left as three separate expressions, each was
    inlined into the output loop and recomputed (a sqrt and ~25 scalar ops) for every
    32-element chunk of every row, which made the op 2x slower on CPU (BENCHMARKS.md §4).
    """
    x = h.float()
    b1, b2 = basis[0], basis[1]
    p1 = (x * b1).sum(-1)  # in-plane coordinates (h·b1, h·b2), [N]
    p2 = (x * b2).sum(-1)
    coef = _coefficients(p1, p2, table, gate, x.dtype)  # [N, 3] per-token scalars
    out = (x + coef[:, 0:1] * b1 + coef[:, 1:2] * b2).to(h.dtype)
    return torch.where(coef[:, 2:3] > 0, out, h)


def rotate_planes(
    h: torch.Tensor,
    bases: torch.Tensor,
    table: torch.Tensor,
    onehot: torch.Tensor,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """rotate() with a plane per token, chosen among K loaded planes.

    bases:  [K, 2, H] float32, K orthonormal planes (unused slots may be zero).
    onehot: [N, K] float32, 1 at the token's plane (all zero for an unsteered token).

    Shapes never depend on which planes a batch uses: every token reads its own plane's b1,
    b2 from the [K, 2, H] buffer by index, and the arithmetic is rotate()'s, so a token gets
    exactly what rotate() with its plane alone gives it. K = 1 is rotate() itself.
    """
    if bases.shape[0] == 1:  # fixed per engine (the buffer's shape), never a branch on values
        return rotate(h, bases[0], table, gate)
    x = h.float()
    # Each token's own basis, by index: under torch.compile an indexed load inside the same
    # fused row kernel as rotate() (no [N, 2, H] tensor is materialised). Projecting on all
    # K planes with a [H, 2K] matmul instead measured 14x slower per site at K = 8 on CPU.
    index = onehot.argmax(-1)  # an unsteered row's all-zero one-hot picks slot 0, masked anyway
    b1, b2 = bases[index, 0], bases[index, 1]
    p1 = (x * b1).sum(-1)
    p2 = (x * b2).sum(-1)
    coef = _coefficients(p1, p2, table, gate, x.dtype)
    out = (x + coef[:, 0:1] * b1 + coef[:, 1:2] * b2).to(h.dtype)
    return torch.where(coef[:, 2:3] > 0, out, h)


def _coefficients(
    p1: torch.Tensor,
    p2: torch.Tensor,
    table: torch.Tensor,
    gate: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[N, 3]: how much of b1 and b2 to add to each token, and whether to steer it at all."""
    cos, sin = table[:, COS], table[:, SIN]
    relative = table[:, RELATIVE]

    # Target in-plane coordinates. Absolute: length ‖Ph‖ at angle θ. Relative: (p1,p2) turned by θ.
    r = torch.sqrt(p1 * p1 + p2 * p2)
    t1 = relative * (p1 * cos - p2 * sin) + (1.0 - relative) * (r * cos)
    t2 = relative * (p1 * sin + p2 * cos) + (1.0 - relative) * (r * sin)

    # m(h): plain mode steers every active token; adaptive only those leaning toward b1.
    leaning = (p1 > 0).to(dtype)
    mask = table[:, ACTIVE] * (1.0 - table[:, ADAPTIVE] * (1.0 - leaning))
    if gate is not None:
        mask = mask * gate
    return torch.stack([t1 - p1, t2 - p2, mask], dim=-1)


def rotate_to(
    h: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    degrees: float,
    adaptive: bool = False,
) -> torch.Tensor:
    """Convenience: every token of h [N, H] rotated to one absolute angle."""
    table = angle_table([degrees] * h.shape[0], adaptive=adaptive, device=h.device)
    return rotate(h, torch.stack([b1, b2]).float(), table)


def rotate_by(h: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, degrees: float) -> torch.Tensor:
    """Convenience: every token of h [N, H] turned by `degrees` inside the plane (relative)."""
    table = angle_table([degrees] * h.shape[0], relative=True, device=h.device)
    return rotate(h, torch.stack([b1, b2]).float(), table)


def in_plane_angle(h: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Angle in degrees [0, 360) of each token's in-plane part, measured from b1 toward b2."""
    x = h.float()
    deg = torch.rad2deg(torch.atan2(x @ b2.float(), x @ b1.float()))
    return torch.remainder(deg, 360.0)


# --- The classic interventions are rotations ------------------------------------------------
#
# Every site rotserve steers is followed by (or is) an RMSNorm, which keeps only the direction
# of its input: RMSNorm(c·x) = RMSNorm(x) for c > 0. So an intervention is characterised by
# the direction it gives each token, and both classic ones move h inside span(h, b):
#
#   addition  h + αb   turns h toward b by an angle that depends on ‖h‖ and on h's angle to b,
#                       so every token is turned by a different, uncontrolled amount (and its
#                       norm changes, which is invisible after RMSNorm but not in the stream).
#   ablation  h − (h·b)b  is h turned to exactly 90° from b, then shrunk by |sin β|: it can
#                       only ever reach 90°.
#
# rotserve's rotation sets the angle itself, the same for every token, any value in [0, 360).


def token_plane(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token basis [N, 2, H] of span(h, b): b, then h's unit component orthogonal to b.

    This is the plane in which addition and ablation act on each token.
    """
    x = h.float()
    b = (b / b.norm()).float()
    perp = x - (x @ b)[:, None] * b
    e2 = perp / perp.norm(dim=1, keepdim=True)
    return torch.stack([b.expand_as(x), e2], dim=1)


def angle_to(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle β in radians between each token of h [N, H] and the direction b, in [0, π]."""
    x = h.float()
    b = (b / b.norm()).float()
    return torch.atan2((x - (x @ b)[:, None] * b).norm(dim=1), x @ b)


def addition_equivalent_angle(h: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Target angle (radians, from b, in span(h, b)) that h + α·b̂ points at, per token.

    h at angle β from b has in-plane coordinates (‖h‖cos β, ‖h‖sin β) in the basis
    token_plane(h, b); adding α·b̂ moves the first one only, so the new angle is
    atan2(‖h‖ sin β, ‖h‖ cos β + α): it depends on ‖h‖, token by token.
    """
    beta = angle_to(h, b)
    norm = h.float().norm(dim=1)
    return torch.atan2(norm * torch.sin(beta), norm * torch.cos(beta) + alpha)


def addition_turn(h: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """How far (radians) adding α·b̂ turns each token toward b: β − addition_equivalent_angle."""
    return angle_to(h, b) - addition_equivalent_angle(h, b, alpha)


def ablation_scale(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Directional ablation = rotation to 90° in span(h, b), times this factor |sin β| per token."""
    return torch.sin(angle_to(h, b)).abs()


def rotate_in_token_plane(
    h: torch.Tensor, b: torch.Tensor, angle_rad: torch.Tensor
) -> torch.Tensor:
    """Rotate each token of h to angle_rad[i] (from b) inside its own span(h_i, b)."""
    x = h.float()
    planes = token_plane(x, b)  # [N, 2, H]
    norm = x.norm(dim=1)
    # h lies entirely in its own plane, so rotating it is setting its two coordinates.
    coords = torch.stack([norm * torch.cos(angle_rad), norm * torch.sin(angle_rad)], dim=1)
    return torch.einsum("nk,nkh->nh", coords, planes).to(h.dtype)
