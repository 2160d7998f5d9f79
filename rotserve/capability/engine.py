"""The capability eval on an engine: one shard of (request, setting) units in ONE generate call.

Every unit is one vLLM request with its setting's steering in `SamplingParams.extra_args` and
the setting's prefix-cache salt (the one RotServeEngine and `rotserve serve` use), so requests
at every setting share the batch and requests at one setting share cached prefixes (the four
choices of a question, a few-shot preamble). A loglikelihood is a prefill with prompt log-probs
(top 1) over context + continuation; a generation samples as vLLM's completions server would
for the same request (its generation-config defaults, then the request's fields), so answers
equal what lm-eval's `local-completions` gets from `rotserve serve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rotserve.capability.plan import GENERATE, CapabilityShard, EngineRequest
from rotserve.capability.table import ANSWER_SCHEMA
from rotserve.fanout import EngineSpec, FanOutError, Worker, make_engine
from rotserve.grid.plan import Condition
from rotserve.rundir import is_default_setting
from rotserve.steering import parse_request

# vLLM's completions server: a request's field, else the model's generation config, else these.
SERVER_DEFAULTS = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}


class CapabilityRunError(FanOutError):
    """The engine gave no usable answer; finished parts are kept and a rerun resumes."""


@dataclass(frozen=True)
class AnswerContext:
    """Per-table constants stamped on every answer, and the run's selective windows."""

    capability_id: str
    selective: dict[str, str] = field(default_factory=dict)  # plane name -> canonical window


@dataclass(frozen=True)
class CapabilityWorkerSpec:
    engine: EngineSpec
    answers: AnswerContext


class CapabilityWorker(Worker):
    """A steered engine in one actor, answering shards of (request, setting) units."""

    def __init__(self, spec: CapabilityWorkerSpec) -> None:
        self.engine = make_engine(spec.engine)
        self.ctx = spec.answers

    def __call__(self, shard: CapabilityShard) -> pa.Table:
        return answer_shard(self.engine, shard, self.ctx)

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def close(self) -> None:
        self.engine.close()


def setting_steering(engine: Any, c: Condition, ctx: AnswerContext) -> tuple[Any, str | None]:
    """(SamplingParams.extra_args, prefix-cache salt) of a setting; (None, None) unsteered.

    A run of one plane at every layer asks exactly what a single-plane request asks (no plane,
    no window), as the grid does; a sweep names both."""
    if c.angle is None:
        return None, None
    fields: dict[str, Any] = {"angle": c.angle, "adaptive": c.adaptive, "mode": "absolute"}
    if not is_default_setting(c.plane, c.window):
        fields["plane"] = c.plane
        fields["layers"] = ctx.selective[c.plane or ""] if c.window == "selective" else c.window
    steering = parse_request({"rotserve": fields})
    return steering.as_extra_args(), engine.setup.resolve(steering).cache_salt()


def generation_defaults(engine: Any) -> dict[str, Any]:
    """The sampling defaults vLLM's server applies to a completion request that omits them."""
    diff = engine.vllm_config.model_config.get_diff_sampling_param()
    return {k: diff.get(k, v) for k, v in SERVER_DEFAULTS.items()}


def sampling_params(
    request: EngineRequest, extra_args: Any, defaults: dict[str, Any], max_model_len: int
) -> Any:
    from vllm import SamplingParams

    if request.kind != GENERATE:
        # Prompt log-probs with the top-1 entry beside the prompt's own token: the scored sum
        # and "was it greedy", as the server's echo + logprobs=1 reports them.
        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=1,
            detokenize=False,
            extra_args=extra_args,
        )
    fields = dict(request.sampling)
    sampled = {k: fields.pop(k, v) for k, v in defaults.items()}
    max_tokens = min(int(fields.pop("max_tokens")), max_model_len - request.n_tokens)
    return SamplingParams.from_optional(
        n=1,
        **sampled,
        max_tokens=max_tokens,
        stop=list(fields.pop("stop", ())),
        extra_args=extra_args,
        **fields,
    )


def answer_shard(engine: Any, shard: CapabilityShard, ctx: AnswerContext) -> pa.Table:
    """One shard's answers in ONE generate call (every setting of the shard mixed)."""
    units = shard.units()
    steer = {c: setting_steering(engine, c, ctx) for c in shard.settings}
    defaults = generation_defaults(engine)
    max_len = engine.vllm_config.model_config.max_model_len
    prompts, params = [], []
    for request, setting in units:
        extra_args, salt = steer[setting]
        prompt: dict[str, Any] = {"prompt_token_ids": request.token_ids}
        if salt is not None:
            prompt["cache_salt"] = salt
        prompts.append(prompt)
        params.append(sampling_params(request, extra_args, defaults, max_len))
    outputs = engine.llm.generate(prompts, params, use_tqdm=False)
    if len(outputs) != len(units):
        raise CapabilityRunError(f"the engine returned {len(outputs)} outputs for {len(units)}")
    rows = [
        answer_row(request, setting, out, ctx)
        for (request, setting), out in zip(units, outputs, strict=True)
    ]
    return pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA)


def answer_row(request: EngineRequest, c: Condition, out: Any, ctx: AnswerContext) -> dict:
    ids = request.token_ids
    if list(out.prompt_token_ids or ()) != ids:
        raise CapabilityRunError(
            f"request {request.key}: the engine's output is for another prompt (pairing broke)"
        )
    row: dict[str, Any] = {
        "capability_id": ctx.capability_id,
        "request_key": request.key,
        "kind": request.kind,
        "angle": c.angle,
        "adaptive": c.adaptive,
        "plane": c.plane,
        "window": c.window,
        "prompt_tokens": len(ids),
    }
    if request.kind == GENERATE:
        comp = out.outputs[0]
        return {
            **row,
            "generation": comp.text,
            "output_tokens": len(comp.token_ids),
            "finish_reason": comp.finish_reason,
        }
    logprob, greedy = continuation_score(ids, out.prompt_logprobs, request.n_continuation)
    return {
        **row,
        "logprob": logprob,
        "is_greedy": greedy,
        "output_tokens": request.n_continuation,
        "finish_reason": None,
    }


def continuation_score(
    ids: list[int], prompt_logprobs: Any, n_continuation: int
) -> tuple[float, bool]:
    """(sum of the last n_continuation tokens' log-probs, every one of them the top-1), summed
    left to right in Python as lm-eval sums the server's numbers."""
    steps = list(prompt_logprobs or [])
    greedy, scored = True, []
    for j in range(len(ids) - n_continuation, len(ids)):
        step = steps[j]
        lp = step[ids[j]].logprob
        scored.append(lp)
        if lp != max(v.logprob for v in step.values()):
            greedy = False
    return sum(scored), greedy
