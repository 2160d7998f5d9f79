"""The judge on an engine: a stock vLLM model (no plane), answers constrained to the labels.

Every judge call is a guided choice (vLLM structured outputs): the sampler may only spell one
of the rubric's labels, then stop, so even a tiny judge cannot give an unparseable verdict.
Greedy, so a verdict is reproducible. Prompts travel as token ids, built and fitted to the
context by the driver (rotserve.judge.prompts), so the engine never re-tokenizes them (a
re-tokenized chat text could gain a second BOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from rotserve.fanout import EngineSpec, FanOutError, Worker, make_engine
from rotserve.judge.plan import JudgeShard
from rotserve.judge.prompts import answer_budget
from rotserve.rundir import VERDICT_SCHEMA


class JudgeRunError(FanOutError):
    """The judge gave no usable answer; finished parts are kept and a rerun resumes."""


@dataclass(frozen=True)
class VerdictContext:
    """Per-table constants stamped on every verdict, and the rubric's labels."""

    run_id: str
    judge: str
    rubric: str
    labels: tuple[str, ...]


class JudgeEngine:
    """One stock engine (rotserve's engine with no plane) that answers with a label."""

    def __init__(self, spec: EngineSpec) -> None:
        if spec.steered:
            raise ValueError("a judge engine serves the stock model: its spec has no plane")
        self.engine = make_engine(spec)
        self.llm = self.engine.llm

    def choose(
        self, prompts: Sequence[Sequence[int]], labels: Sequence[str]
    ) -> list[tuple[str, str | None]]:
        """(text, finish reason) per prompt, the text constrained to one of `labels`."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = SamplingParams(
            temperature=0.0,
            max_tokens=answer_budget(tuple(labels)),
            structured_outputs=StructuredOutputsParams(choice=list(labels)),
        )
        outs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False
        )
        return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]

    def close(self) -> None:
        self.engine.close()


@dataclass(frozen=True)
class JudgeWorkerSpec:
    """What every judge actor is built from: its stock engine and the verdicts' constants."""

    engine: EngineSpec
    verdicts: VerdictContext


class JudgeWorker(Worker):
    """A judge engine in one actor, turning shards of judge prompts into verdicts."""

    def __init__(self, spec: JudgeWorkerSpec) -> None:
        self.engine = JudgeEngine(spec.engine)
        self.verdicts = spec.verdicts

    def __call__(self, shard: JudgeShard) -> pa.Table:
        return judge_shard(self.engine, shard, self.verdicts)

    def info(self) -> dict[str, Any]:
        return self.engine.engine.info()

    def close(self) -> None:
        self.engine.close()


def judge_shard(engine: Any, shard: JudgeShard, ctx: VerdictContext) -> pa.Table:
    """One shard's verdicts in ONE generate call; rule-labelled rows need no engine."""
    asked = [it for it in shard.items if it.rule_label is None]
    answers = engine.choose([it.token_ids for it in asked], ctx.labels) if asked else []
    if len(answers) != len(asked):
        raise JudgeRunError(f"the judge returned {len(answers)} answers for {len(asked)} prompts")
    by_key = {it.row_key: a for it, a in zip(asked, answers, strict=True)}
    rows = []
    for it in shard.items:
        raw, label = None, it.rule_label
        if label is None:
            raw, finish = by_key[it.row_key]
            label = raw.strip()
            if label not in ctx.labels:  # guided choice makes this impossible; say so if not
                raise JudgeRunError(
                    f"the judge answered {raw!r} (finish {finish}) for row {it.row_key}, not one "
                    f"of the labels {list(ctx.labels)}: structured outputs did not hold"
                )
        rows.append(
            {
                "run_id": ctx.run_id,
                "row_key": it.row_key,
                "judge": ctx.judge,
                "rubric": ctx.rubric,
                "label": label,
                "raw": raw,
                "by_rule": it.rule_label is not None,
                "truncated": it.truncated,
                "judge_prompt_tokens": it.n_tokens,
            }
        )
    return pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA)
