"""The per-token table a steered model reads, and how it is refreshed every step.

Torch only, so its slot logic is tested without vLLM; the vLLM plugin's models, tracker and
V2 model state hold these. Three pieces, used by both model runners:

- RequestRows: one angle-table row per request slot (host copy + device copy), written when
  a request joins the batch and pushed to the device without a host stall (pinned staging,
  non-blocking copy of the changed slots only). Slot `capacity` is a permanent identity row
  that padding and unknown tokens point at.
- token_slots(): which slot each token of the flattened batch belongs to, from the batch's
  query_start_loc (tokens of a request are contiguous, requests in batch order) and the
  batch-position -> slot mapping. Pure tensor ops on the batch's own device: no host sync.
- RotationState: an nn.Module holding the K plane bases [K, 2, H] and the per-token table
  [max_num_batched_tokens, 5 + K + S] as buffers: per token its angle row (5 columns), a
  one-hot of its plane (K) and a gate per steered norm (S, its layer window and sites). Both are allocated at model construction, before
  torch.compile traces and before any CUDA graph is captured, and are only ever overwritten
  in place, so compiled graphs and captured graphs keep reading the current values.
"""

from __future__ import annotations

import torch
from torch import nn

from rotserve.rotation import COS, TABLE_WIDTH, rotate_planes
from rotserve.steering.catalog import PlaneCatalog
from rotserve.steering.request import RequestSteering
from rotserve.steering.rows import identity_rows, row_width, steering_row


class RequestRows:
    """Per-request-slot angle rows, host-side source of truth plus a device mirror.

    V1: a slot is a position in the persistent batch. V2: a slot is the runner's request
    index (input_batch.idx_mapping maps batch positions to slots).

    `sync()` pushes only the slots written since the last sync (one contiguous range) and
    never waits for the device. With `pin_memory` (default: on for a CUDA device; pass
    vLLM's `is_pin_memory_available()` to follow the platform) the range is staged in a
    fresh pinned buffer and copied with `non_blocking=True`: the step where a request joins
    does not stall the CPU on the previous GPU step (vLLM's async scheduling prepares step
    n+1 while step n runs).

    Why a fresh staging buffer per sync rather than pinning `host` itself: a non-blocking
    copy reads its source when the stream reaches it, possibly after the next step's
    `set()` has already rewritten the row. `host` stays pageable and freely writable; each
    sync copies the dirty range (a few hundred bytes per request) into a new pinned tensor
    that nothing else references. PyTorch's caching host allocator records the copy's
    stream event on that block and hands it out again only once the copy has completed,
    so no buffer is ever rewritten in flight and nothing here synchronises. This is what
    vLLM's own `async_tensor_h2d` does for the V2 runner's per-step inputs. Ordering with
    the table fill needs nothing either: both run on the current stream, copy first.
    """

    def __init__(
        self,
        capacity: int,
        device: torch.device | str,
        catalog: PlaneCatalog | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        device = torch.device(device)
        self.capacity = capacity
        self.catalog = catalog
        self.identity_slot = capacity  # the extra, never-written row
        width = row_width(catalog)
        self.host = identity_rows(capacity + 1, width=width)
        self.device_rows = identity_rows(capacity + 1, device=device, width=width)
        self._identity = identity_rows(1, width=width)[0]
        # Pinning needs an accelerator runtime (CPU-only torch cannot pin, and a CPU
        # "device" copy is a memcpy that cannot overlap anything anyway).
        self.pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
        # Slots [_dirty_lo, _dirty_hi) differ between host and device; empty when lo >= hi.
        self._dirty_lo, self._dirty_hi = capacity, 0
        # Every host slot >= _used is identity (so clear_from touches only what it must).
        self._used = 0

    def _touch(self, *slots: int) -> None:
        self._dirty_lo = min(self._dirty_lo, *slots)
        self._dirty_hi = max(self._dirty_hi, *(s + 1 for s in slots))

    def set(self, slot: int, steering: RequestSteering) -> None:
        self.host[slot] = steering_row(steering, self.catalog)
        self._touch(slot)
        self._used = max(self._used, slot + 1)

    def clear(self, slot: int) -> None:
        self.host[slot] = self._identity
        self._touch(slot)

    def move(self, src: int, dst: int, swap: bool) -> None:
        if swap:
            self.host[[src, dst]] = self.host[[dst, src]]
        else:
            self.host[dst] = self.host[src]
            self.host[src] = self._identity
        self._touch(src, dst)
        self._used = max(self._used, src + 1, dst + 1)

    def clear_from(self, first_slot: int) -> None:
        """Identity for every slot >= first_slot (V1: slots past the batch size are empty)."""
        if first_slot < self._used:
            self.host[first_slot : self._used] = self._identity
            self._touch(first_slot, self._used - 1)
            self._used = first_slot

    def sync(self) -> None:
        """Push the changed host rows to the device without waiting for it; nothing to do
        on a step where no request joined or left."""
        lo, hi = self._dirty_lo, self._dirty_hi
        if lo >= hi:
            return
        changed = self.host[lo:hi]
        if self.pin_memory:
            changed = changed.pin_memory()  # a fresh staging buffer: see the class docstring
        self.device_rows[lo:hi].copy_(changed, non_blocking=True)
        self._dirty_lo, self._dirty_hi = self.capacity, 0


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
    is_padding: optional [>= num_tokens] bool mask of tokens to force to identity. Tokens
        at or past query_start_loc[-1] are identity without it; V1 passes its runner's mask
        (rewritten every step), V2 none (its mask is not rewritten every step).
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
    """Plane bases and per-token table of one model; called at every steered norm.

    forward(h, site) rotates the first h.shape[0] tokens by their rows of the table, in their
    own plane, gated by their request's window at steered norm number `site`: the same
    unconditional tensor math for every token (inactive rows come back bit-identical), so
    the compiled graph never branches on what the batch holds.

    `bases` is [2, H] (one plane) or [K, 2, H]; `num_gates` is the number of steered norms
    (0: no gate columns, every installed norm steers every active token).
    """

    def __init__(self, bases: torch.Tensor, max_num_tokens: int, num_gates: int = 0) -> None:
        super().__init__()
        if bases.ndim == 2:
            bases = bases[None]
        if bases.ndim != 3 or bases.shape[1] != 2:
            raise ValueError(
                f"bases must be [2, hidden_size] or [K, 2, hidden_size], got {tuple(bases.shape)}"
            )
        self.num_planes = bases.shape[0]
        self.num_gates = num_gates
        self.width = TABLE_WIDTH + (self.num_planes + num_gates if num_gates else 0)
        # Non-persistent: not in the checkpoint, so the weight loader neither expects nor
        # overwrites them.
        self.register_buffer("bases", bases.detach().to(torch.float32).clone(), persistent=False)
        self.register_buffer(
            "token_table", identity_rows(max_num_tokens, width=self.width), persistent=False
        )
        self.register_buffer("_arange", torch.arange(max_num_tokens), persistent=False)
        self.max_num_tokens = max_num_tokens

    @property
    def basis(self) -> torch.Tensor:
        """[2, H] of the first plane (the single-plane engine's basis)."""
        return self.bases[0]

    def forward(self, h: torch.Tensor, gate_column: int | None = None) -> torch.Tensor:
        table = self.token_table[: h.shape[0]]
        if gate_column is None or not self.num_gates:
            gate = None
        else:
            gate = table[:, TABLE_WIDTH + self.num_planes + gate_column]
        onehot = table[:, TABLE_WIDTH : TABLE_WIDTH + self.num_planes]
        return rotate_planes(h, self.bases, table, onehot, gate)

    @torch.no_grad()
    def set_identity(self, num_tokens: int | None = None) -> None:
        """Dummy, profile and capture runs, and padding: every token passes through."""
        table = self.token_table if num_tokens is None else self.token_table[:num_tokens]
        table.zero_()  # one-hots and gates too
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
        if rows.host.shape[1] != self.width:
            raise RuntimeError(
                f"request rows have {rows.host.shape[1]} columns but the rotation table has "
                f"{self.width}: they were built for different planes or steered norms"
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
