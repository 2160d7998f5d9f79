"""The judge on an engine: a stock vLLM model (no plane), answering as the rubric's reading says.

Greedy, so a verdict is reproducible, with the top log-probs of every answer token (the label
probabilities, rotserve.judge.verdict). A `choice` rubric decodes under a constraint (the labels
after optional leading whitespace, so even a tiny judge cannot give an unparseable verdict); a
`one_token` or `first_line` rubric decodes freely, as its official evaluation does, and the text
is read by the rubric. Prompts travel as token ids, built and fitted to the context by the driver
(rotserve.judge.prompts), so the engine never re-tokenizes them (a re-tokenized chat text could
gain a second BOS). Every judge engine first answers the judge canary's anchors with the same
`judge_shard` (rotserve.judge.anchors) and refuses to judge when it fails, unless accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from rotserve.fanout import EngineSpec, FanOutError, Worker, make_engine
from rotserve.judge.anchors import CanaryResult, CanarySpec, grade
from rotserve.judge.config import JudgeCanaryError
from rotserve.judge.plan import JudgeShard
from rotserve.judge.rubrics import Rubric
from rotserve.judge.verdict import TOP_LOGPROBS, Answer, answer_of, choice_regex, label_probs
from rotserve.rundir import VERDICT_SCHEMA

# The grammar backend of a choice rubric's constraint: the one its tests prove admits a judge's
# natural first tokens (tests/test_public_judges.py), pinned rather than vLLM's `auto` pick.
GRAMMAR_BACKEND = "xgrammar"


class JudgeRunError(FanOutError):
    """The judge gave no usable answer; finished parts are kept and a rerun resumes."""


@dataclass(frozen=True)
class VerdictContext:
    """Per-table constants stamped on every verdict, and the rubric that reads the answers."""

    run_id: str
    judge: str
    rubric: Rubric


def sampling_params(rubric: Rubric) -> Any:
    """vLLM SamplingParams of the rubric's reading: greedy, its token budget, top log-probs,
    and for a choice rubric the constraint."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    constraint = (
        StructuredOutputsParams(regex=choice_regex(rubric.labels))
        if rubric.reading == "choice"
        else None
    )
    return SamplingParams(
        temperature=0.0,
        max_tokens=rubric.max_tokens,
        logprobs=TOP_LOGPROBS,
        structured_outputs=constraint,
    )


class JudgeEngine:
    """One stock engine (rotserve's engine with no plane) that answers judge prompts."""

    def __init__(self, spec: EngineSpec) -> None:
        if spec.steered:
            raise ValueError("a judge engine serves the stock model: its spec has no plane")
        self.engine = make_engine(spec)
        self.llm = self.engine.llm

    def answer(self, prompts: Sequence[Sequence[int]], rubric: Rubric) -> list[Answer]:
        """The judge's answer to each prompt (text, finish reason, per-token log-probs)."""
        outs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts],
            sampling_params(rubric),
            use_tqdm=False,
        )
        return [answer_of(o.outputs[0]) for o in outs]

    def close(self) -> None:
        self.engine.close()


@dataclass(frozen=True)
class JudgeWorkerSpec:
    """What every judge actor is built from: its stock engine and the verdicts' constants."""

    engine: EngineSpec
    verdicts: VerdictContext
    canary: CanarySpec | None = None  # None: no canary (skipped, or the rubric has no anchors)


class JudgeWorker(Worker):
    """A judge engine in one actor, turning shards of judge prompts into verdicts; it runs the
    judge canary first and, when that fails and the failure is not accepted, closes its engine
    and raises JudgeCanaryError (the fan-out stops the run: an engine that failed to start)."""

    def __init__(self, spec: JudgeWorkerSpec) -> None:
        self.engine = JudgeEngine(spec.engine)
        self.verdicts = spec.verdicts
        self.canary: CanaryResult | None = None
        if spec.canary is not None:
            try:
                self.canary = run_canary(self.engine, spec.canary, spec.verdicts)
            except BaseException:
                self.engine.close()
                raise
            if not self.canary.passed and not spec.canary.accept_failure:
                self.engine.close()
                # one line: the fan-out reports an engine's start failure by its last line
                raise JudgeCanaryError(self.canary.summary())

    def __call__(self, shard: JudgeShard) -> pa.Table:
        return judge_shard(self.engine, shard, self.verdicts)

    def info(self) -> dict[str, Any]:
        canary = {} if self.canary is None else {"judge_canary": self.canary.as_dict()}
        return {**self.engine.engine.info(), **canary}

    def close(self) -> None:
        self.engine.close()


def run_canary(engine: Any, spec: CanarySpec, ctx: VerdictContext) -> CanaryResult:
    """The anchors judged exactly as rows are (judge_shard), then graded."""
    table = judge_shard(engine, JudgeShard(0, spec.items), ctx)
    return grade(spec.anchors, table.to_pylist())


def judge_shard(engine: Any, shard: JudgeShard, ctx: VerdictContext) -> pa.Table:
    """One shard's verdicts in ONE generate call; rule-labelled rows need no engine."""
    rubric = ctx.rubric
    asked = [it for it in shard.items if it.rule_label is None]
    answers = engine.answer([it.token_ids for it in asked], rubric) if asked else []
    if len(answers) != len(asked):
        raise JudgeRunError(f"the judge returned {len(answers)} answers for {len(asked)} prompts")
    by_key = {it.row_key: a for it, a in zip(asked, answers, strict=True)}
    rows = []
    for it in shard.items:
        raw = parsed = probs = score = None
        label = it.rule_label
        if label is None:
            answer = by_key[it.row_key]
            raw = answer.text
            label, parsed = rubric.read(raw)
            if rubric.reading == "choice" and not parsed:  # the constraint makes this impossible
                raise JudgeRunError(
                    f"the judge answered {raw!r} (finish {answer.finish}) for row {it.row_key}, "
                    f"not one of the labels {list(rubric.labels)}: structured outputs did not "
                    "hold"
                )
            probs = label_probs(rubric, answer.steps)
            score = probs[rubric.score_label] if rubric.score_label else None
        rows.append(
            {
                "run_id": ctx.run_id,
                "row_key": it.row_key,
                "judge": ctx.judge,
                "rubric": rubric.name,
                "label": label,
                "raw": raw,
                "by_rule": it.rule_label is not None,
                "truncated": it.truncated,
                "judge_prompt_tokens": it.n_tokens,
                "parsed": parsed,
                "score": score,
                "probs": None if probs is None else list(probs.items()),
            }
        )
    return pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA)
