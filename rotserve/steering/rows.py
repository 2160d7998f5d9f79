"""One request's row of the per-token rotation table, built alike for every backend.

A row is the 5 angle columns (rotserve.rotation), then with a catalog a one-hot of the
request's plane slot and one gate per steerable (layer, site). The vLLM plugin expands rows to
tokens; the HF reference generator expands them per sequence.
"""

from __future__ import annotations

import torch

from rotserve.rotation import COS, TABLE_WIDTH, angle_table
from rotserve.steering.catalog import PlaneCatalog
from rotserve.steering.request import RequestSteering


def row_width(catalog: PlaneCatalog | None) -> int:
    """Columns of a table row: the angle row, then K plane one-hot, then S gates. No catalog:
    the bare 5-column angle row (one plane, every installed norm steered)."""
    if catalog is None:
        return TABLE_WIDTH
    return TABLE_WIDTH + catalog.slots + len(catalog.steerable)


def identity_rows(
    n: int, device: torch.device | str | None = None, width: int = TABLE_WIDTH
) -> torch.Tensor:
    """[n, width] float32 rows that leave a token bit-identical: cos=1, sin=0, active=0."""
    rows = torch.zeros(n, width, dtype=torch.float32, device=device)
    rows[:, COS] = 1.0
    return rows


def steering_row(steering: RequestSteering, catalog: PlaneCatalog | None = None) -> torch.Tensor:
    """One request's row, through rotserve.rotation's own table builder so the angle numbers
    are bit-identical to the HF reference generator's. With a catalog, the plane one-hot and
    the gates follow (RequestSteeringError for an unknown plane or unsteerable layer)."""
    row = identity_rows(1, width=row_width(catalog))[0]
    if steering.angle is None:
        return row
    row[:TABLE_WIDTH] = angle_table(
        [steering.angle], adaptive=steering.adaptive, relative=steering.relative
    )[0]
    if catalog is not None:
        resolved = catalog.resolve(steering)
        row[TABLE_WIDTH + resolved.slot] = 1.0
        gate0 = TABLE_WIDTH + catalog.slots
        row[gate0 : gate0 + len(resolved.gates)] = torch.tensor(resolved.gates, dtype=torch.float32)
    return row
