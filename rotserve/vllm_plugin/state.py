"""The tensors the compiled model reads to rotate, and how they are refreshed every step.

Three pieces, used by both model runners:

- RequestRows: one angle-table row per request slot (host copy + device copy), written when
  a request joins the batch. Slot `capacity` is a permanent identity row that padding and
  unknown tokens point at.
- token_slots(): which slot each token of the flattened batch belongs to, from the batch's
  query_start_loc (tokens of a request are contiguous, requests in batch order) and the
  batch-position -> slot mapping. Pure tensor ops on the batch's own device: no host sync.
- RotationState: an nn.Module holding the plane basis [2, H] and the per-token table
  [max_num_batched_tokens, 5] as buffers. Both are allocated at model construction, before
  torch.compile traces and before any CUDA graph is captured, and are only ever overwritten
  in place, so compiled graphs and captured graphs keep reading the current values.
"""

from __future__ import annotations

import torch
from torch import nn

from rotserve.rotation import COS, TABLE_WIDTH, angle_table, rotate
from rotserve.vllm_plugin.config import RequestSteering


def identity_rows(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[n, 5] float32 rows that leave a token bit-identical: cos=1, sin=0, active=0."""
    rows = torch.zeros(n, TABLE_WIDTH, dtype=torch.float32, device=device)
    rows[:, COS] = 1.0
    return rows


def steering_row(steering: RequestSteering) -> torch.Tensor:
    """[5] float32 row for one request, through rotserve.rotation's own table builder so the
    numbers are bit-identical to the HF reference generator's."""
    if steering.angle is None:
        return identity_rows(1)[0]
    return angle_table([steering.angle], adaptive=steering.adaptive, relative=steering.relative)[0]


class RequestRows:
    """Per-request-slot angle rows, host-side source of truth plus a device mirror.

    V1: a slot is a position in the persistent batch. V2: a slot is the runner's request
    index (input_batch.idx_mapping maps batch positions to slots).
    """

    def __init__(self, capacity: int, device: torch.device | str) -> None:
        self.capacity = capacity
        self.identity_slot = capacity  # the extra, never-written row
        self.host = identity_rows(capacity + 1)
        self.device_rows = identity_rows(capacity + 1, device=device)
        self._dirty = False

    def set(self, slot: int, steering: RequestSteering) -> None:
        self.host[slot] = steering_row(steering)
        self._dirty = True

    def clear(self, slot: int) -> None:
        self.host[slot] = identity_rows(1)[0]
        self._dirty = True

    def move(self, src: int, dst: int, swap: bool) -> None:
        if swap:
            self.host[[src, dst]] = self.host[[dst, src]]
        else:
            self.host[dst] = self.host[src]
            self.host[src] = identity_rows(1)[0]
        self._dirty = True

    def clear_from(self, first_slot: int) -> None:
        """Identity for every slot >= first_slot (V1: slots past the batch size are empty)."""
        self.host[first_slot : self.capacity] = identity_rows(1)
        self._dirty = True

    def sync(self) -> None:
        """Push host rows to the device; only when something changed (requests joined or
        left), so a steady decode step costs nothing here."""
        if self._dirty:
            self.device_rows.copy_(self.host)
            self._dirty = False


def token_slots(
    query_start_loc: torch.Tensor,
    num_tokens: int,
    identity_slot: int,
    slot_of_request: torch.Tensor | None = None,
    is_padding: torch.Tensor | None = None,
    arange: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slot of each of the first num_tokens tokens, as int64 on query_start_loc's device.

    query_start_loc: [num_reqs + 1] cumulative token offsets in batch order (requests padded
        with zero tokens are fine). Token t belongs to batch position
        #{i : query_start_loc[i+1] <= t}; positions >= num_reqs are padding.
    slot_of_request: [num_reqs] batch position -> slot (V2's idx_mapping); None = identity
        mapping (V1's persistent batch, where the position is the slot).
    is_padding: optional [>= num_tokens] bool mask of tokens to force to identity.
    """
    ends = query_start_loc[1:].to(torch.int64)
    num_reqs = ends.shape[0]
    device = query_start_loc.device
    if arange is None or arange.shape[0] < num_tokens:
        arange = torch.arange(num_tokens, device=device)
    tok = arange[:num_tokens]
    identity = torch.full_like(tok, identity_slot)
    if num_reqs == 0:
        return identity
    position = torch.searchsorted(ends, tok, right=True)  # [num_tokens] in 0..num_reqs
    real = position < num_reqs
    position = position.clamp(max=num_reqs - 1)
    if slot_of_request is not None:
        slot = slot_of_request.to(torch.int64)[position]
    else:
        slot = position
    slot = torch.where(real, slot, identity)
    if is_padding is not None:
        slot = torch.where(is_padding[:num_tokens], identity, slot)
    return slot


class RotationState(nn.Module):
    """Plane basis and per-token angle table of one model; called at every steered norm.

    forward(h) rotates the first h.shape[0] tokens by their rows of the table: the same
    unconditional tensor math for every token (inactive rows come back bit-identical), so
    the compiled graph never branches on what the batch holds.
    """

    def __init__(self, basis: torch.Tensor, max_num_tokens: int) -> None:
        super().__init__()
        if basis.ndim != 2 or basis.shape[0] != 2:
            raise ValueError(f"basis must be [2, hidden_size], got {tuple(basis.shape)}")
        # Non-persistent: not in the checkpoint, so the weight loader neither expects nor
        # overwrites them.
        self.register_buffer("basis", basis.detach().to(torch.float32).clone(), persistent=False)
        self.register_buffer("token_table", identity_rows(max_num_tokens), persistent=False)
        self.register_buffer("_arange", torch.arange(max_num_tokens), persistent=False)
        self.max_num_tokens = max_num_tokens

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return rotate(h, self.basis, self.token_table[: h.shape[0]])

    @torch.no_grad()
    def set_identity(self, num_tokens: int | None = None) -> None:
        """Dummy, profile and capture runs, and padding: every token passes through."""
        table = self.token_table if num_tokens is None else self.token_table[:num_tokens]
        table.zero_()
        table[:, COS] = 1.0

    @torch.no_grad()
    def fill(
        self,
        rows: RequestRows,
        query_start_loc: torch.Tensor,
        num_tokens: int,
        slot_of_request: torch.Tensor | None = None,
        is_padding: torch.Tensor | None = None,
    ) -> None:
        """Write this step's table in place: each token gets its request's row.

        Like LoRA's token mapping (per-request ids repeated by num_scheduled_tokens), done
        with searchsorted on query_start_loc so it stays on the device.
        """
        if num_tokens > self.max_num_tokens:
            raise RuntimeError(
                f"batch of {num_tokens} tokens exceeds the rotation table "
                f"({self.max_num_tokens} = max_num_batched_tokens)"
            )
        rows.sync()
        device_rows = rows.device_rows
        qsl = query_start_loc.to(device_rows.device, non_blocking=True)
        slots = token_slots(
            qsl,
            num_tokens,
            rows.identity_slot,
            slot_of_request=None
            if slot_of_request is None
            else slot_of_request.to(device_rows.device, non_blocking=True),
            is_padding=None
            if is_padding is None
            else is_padding.to(device_rows.device, non_blocking=True),
            arange=self._arange.to(device_rows.device),
        )
        self.token_table[:num_tokens].copy_(device_rows[slots])
