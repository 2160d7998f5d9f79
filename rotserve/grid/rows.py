"""The grid's worker: one shard of (prompt, condition) units through a steered engine in one
generate call, each completion paired with its unit and scored into a row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from rotserve.fanout import EngineSpec, FanOutError, Worker, make_engine
from rotserve.grid.plan import Shard, WorkUnit
from rotserve.rundir import is_default_setting, to_table
from rotserve.scoring import coherence, fluency, is_refusal

if TYPE_CHECKING:
    from rotserve.engine import Completion


class GridRunError(FanOutError):
    """The grid could not finish; finished parts are kept and a rerun resumes from them."""


@dataclass(frozen=True)
class RowContext:
    """Per-run constants stamped on every row, and the sampling settings."""

    run_id: str
    model: str
    plane_id: str
    max_tokens: int
    temperature: float
    seed: int
    samples: int
    coherence: bool = True  # score every generation under the unsteered model (nll column)
    # The "selective" window's layers per plane name (canonical list), for sweeps that use it.
    selective: dict[str, str] = field(default_factory=dict)


class GridEngine(Protocol):
    """What the grid needs of an engine: RotServeEngine is one."""

    def generate(
        self,
        instructions: Sequence[str],
        angles: Sequence[float | None],
        adaptive: Sequence[bool],
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        n: int,
        chat: bool,
        plane: Sequence[str | None] | None = None,
        layers: Sequence[str | None] | None = None,
    ) -> list[Completion]: ...

    def continuation_logprobs(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        continuation_token_ids: Sequence[Sequence[int]],
    ) -> list[tuple[float, ...]]: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class GridWorkerSpec:
    """What every grid actor is built from: its engine and the rows' constants."""

    engine: EngineSpec
    rows: RowContext


class GridWorker(Worker):
    """A steered engine in one actor, turning shards into rows."""

    def __init__(self, spec: GridWorkerSpec) -> None:
        self.engine: GridEngine = make_engine(spec.engine)
        self.rows = spec.rows

    def __call__(self, shard: Shard) -> pa.Table:
        return to_table(generate_shard(self.engine, shard, self.rows))

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def close(self) -> None:
        self.engine.close()


def generate_shard(engine: GridEngine, shard: Shard, ctx: RowContext) -> list[dict[str, Any]]:
    """Run one shard through the engine in ONE generate call (mixed angles share batches)."""
    units = shard.units
    # Plane and window go to the engine only in a sweep: a run of one plane at every layer
    # asks the engine exactly what single-plane runs always did.
    sweep: dict[str, Any] = {}
    if not all(is_default_setting(u.condition.plane, u.condition.window) for u in units):
        sweep = {
            "plane": [u.condition.plane for u in units],
            "layers": [_window(u, ctx) for u in units],
        }
    completions = engine.generate(
        [u.instruction for u in units],
        angles=[u.condition.angle for u in units],
        adaptive=[u.condition.adaptive for u in units],
        max_tokens=ctx.max_tokens,
        temperature=ctx.temperature,
        seed=ctx.seed,
        n=ctx.samples,
        chat=True,
        **sweep,
    )
    scores = None
    if ctx.coherence:  # one more batch of prefills, unsteered: what the stock model makes of it
        scores = engine.continuation_logprobs(
            [c.prompt_token_ids for c in completions], [c.token_ids for c in completions]
        )
    return shard_rows(units, completions, ctx, scores)


def _window(unit: WorkUnit, ctx: RowContext) -> str | None:
    """The unit's layer window as the engine reads it ("selective" is per plane)."""
    if unit.condition.window == "selective":
        return ctx.selective[unit.condition.plane or ""]
    return unit.condition.window


def shard_rows(
    units: tuple[WorkUnit, ...],
    completions: Sequence[Completion],
    ctx: RowContext,
    unsteered_logprobs: Sequence[Sequence[float]] | None = None,
) -> list[dict[str, Any]]:
    """Pair completions with work units (n consecutive ones per unit) and score them;
    `unsteered_logprobs` (one per completion) fill the coherence columns."""
    n = ctx.samples
    if len(completions) != len(units) * n:
        raise GridRunError(
            f"engine returned {len(completions)} completions for {len(units)} prompts × {n} samples"
        )
    rows = []
    for i, unit in enumerate(units):
        for s in range(n):
            rec = completions[i * n + s]
            _check_pairing(rec, unit, s, i * n + s)
            text = rec.generation
            refused, marker = is_refusal(text)
            nll, ppl = (
                coherence(unsteered_logprobs[i * n + s])
                if unsteered_logprobs is not None
                else (None, None)
            )
            rows.append(
                {
                    "run_id": ctx.run_id,
                    "model": ctx.model,
                    # The row's own plane; the baseline carries the default plane's id.
                    "plane_id": rec.plane_id or ctx.plane_id,
                    "dataset": unit.dataset,
                    "prompt_id": unit.prompt_id,
                    "instruction": unit.instruction,
                    "prompt": rec.prompt,
                    "category": unit.category,
                    "angle": unit.condition.angle,
                    "adaptive": unit.condition.adaptive,
                    "plane": unit.condition.plane,
                    "window": unit.condition.window,
                    "sample": s,
                    "seed": ctx.seed,
                    "temperature": ctx.temperature,
                    "max_tokens": ctx.max_tokens,
                    "generation": text,
                    "prompt_tokens": rec.prompt_tokens,
                    "output_tokens": rec.output_tokens,
                    "finish_reason": rec.finish_reason,
                    "refusal": refused,
                    "refusal_marker": marker,
                    "fluency": fluency(text),
                    "nll": nll,
                    "perplexity": ppl,
                }
            )
    return rows


def _check_pairing(rec: Completion, unit: WorkUnit, sample: int, index: int) -> None:
    """A reordering inside the engine must fail loudly, not mislabel rows. The engine names a
    completion's plane only when it steered one (None: unsteered, or the default plane)."""
    got = (rec.instruction, rec.angle, rec.adaptive, rec.sample)
    want = (unit.instruction, unit.condition.angle, unit.condition.adaptive, sample)
    if got != want or (rec.plane is not None and rec.plane != unit.condition.plane):
        raise GridRunError(
            f"engine completion {index} is for (instruction, angle, adaptive, sample) "
            f"{got!r}, expected {want!r}"
        )
