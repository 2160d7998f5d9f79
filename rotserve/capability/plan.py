"""The capability eval as work: every engine request at every steering setting, cut into
deterministic shards. Pure.

An engine request is what lm-eval's requests become on the model side: the token ids of a
context + continuation whose continuation log-prob is wanted (`loglikelihood`), or of a context
to continue with the task's stop strings and token budget (`generate_until`). Requests are
deduplicated (two tasks or two choices asking the same thing are asked once) and keep the order
lm-eval built them in. Units are laid out request-major, settings innermost, and cut into
consecutive shards of `shard_size` units, as the grid lays out prompts x conditions: each shard
is one generate call in which a few requests are asked at every setting, mixed in one batch.
The same requests and settings always give the same shards, which is what resume and
exactly-once rely on.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rotserve.grid.plan import Condition

LOGLIKELIHOOD = "loglikelihood"
GENERATE = "generate_until"
KINDS = (LOGLIKELIHOOD, GENERATE)


@dataclass(frozen=True)
class EngineRequest:
    """One request to the engine, at no particular setting.

    Token ids are packed int32 bytes (a plan holds every request of every task). `sampling` is
    a generation's SamplingParams fields as sorted (name, value) pairs; empty for a
    loglikelihood, whose scored continuation is the last `n_continuation` tokens."""

    key: str
    kind: str
    tokens: bytes
    n_continuation: int = 0
    sampling: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(
        cls,
        kind: str,
        token_ids: Sequence[int],
        n_continuation: int = 0,
        sampling: dict[str, Any] | None = None,
    ) -> EngineRequest:
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; one of {KINDS}")
        ids = [int(t) for t in token_ids]
        fields = tuple(sorted((sampling or {}).items()))
        blob = json.dumps([kind, ids, n_continuation, fields], separators=(",", ":"))
        key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        return cls(key, kind, array("i", ids).tobytes(), n_continuation, fields)

    @property
    def token_ids(self) -> list[int]:
        return array("i", self.tokens).tolist()

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) // array("i").itemsize


@dataclass(frozen=True)
class CapabilityShard:
    """Units [start, end) of the plan: unit u is request u // S at setting u % S."""

    index: int
    start: int
    end: int
    requests: tuple[EngineRequest, ...]  # the requests units start..end-1 name, in order
    first_request: int  # plan index of requests[0]
    settings: tuple[Condition, ...]

    @property
    def shard_id(self) -> str:
        return f"{self.index:05d}"

    @property
    def n_rows(self) -> int:
        return self.end - self.start

    def units(self) -> list[tuple[EngineRequest, Condition]]:
        s = len(self.settings)
        return [
            (self.requests[u // s - self.first_request], self.settings[u % s])
            for u in range(self.start, self.end)
        ]


@dataclass(frozen=True)
class CapabilityPlan:
    requests: tuple[EngineRequest, ...]
    settings: tuple[Condition, ...]
    shards: tuple[CapabilityShard, ...]
    fingerprint: str  # hash of every request key and setting, in order, and the shard size

    @property
    def n_rows(self) -> int:
        return len(self.requests) * len(self.settings)

    def shard(self, shard_id: str) -> CapabilityShard:
        return self.shards[int(shard_id)]


def setting_key(c: Condition) -> list[Any]:
    """A setting as the key columns name it: [angle, adaptive, plane, window]."""
    return [c.angle, c.adaptive, c.plane, c.window]


def make_capability_plan(
    requests: Sequence[EngineRequest], settings: Sequence[Condition], shard_size: int
) -> CapabilityPlan:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not requests or not settings:
        raise ValueError("a plan needs at least one request and one setting")
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("two engine requests share a key: deduplicate them first")
    if len(set(settings)) != len(settings):
        raise ValueError("a setting appears twice")
    requests, settings = tuple(requests), tuple(settings)
    s, total = len(settings), len(requests) * len(settings)
    shards = []
    for i, start in enumerate(range(0, total, shard_size)):
        end = min(start + shard_size, total)
        first, last = start // s, (end - 1) // s
        shards.append(CapabilityShard(i, start, end, requests[first : last + 1], first, settings))
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode() + b"\n")
    h.update(json.dumps([setting_key(c) for c in settings]).encode())
    h.update(f"shard_size={shard_size}".encode())
    return CapabilityPlan(requests, settings, tuple(shards), h.hexdigest()[:16])
