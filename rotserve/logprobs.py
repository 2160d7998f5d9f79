"""Readers of the log-probs vLLM returns, as plain tuples of floats.

The engine (generate, continuation_logprobs) and the start-up canary both read them.
"""

from __future__ import annotations

from typing import Any


def chosen_logprobs(completion: Any) -> tuple[float, ...]:
    """Log-prob of each token a vLLM CompletionOutput generated (requested with logprobs=0)."""
    return tuple(
        step[token].logprob
        for step, token in zip(completion.logprobs or [], completion.token_ids, strict=False)
    )


def prompt_token_logprobs(output: Any) -> tuple[float, ...]:
    """Log-prob of prompt tokens 1..n-1 of a vLLM RequestOutput (requested with
    prompt_logprobs=0; token 0 has none)."""
    ids = output.prompt_token_ids or []
    steps = list(output.prompt_logprobs or [])
    return tuple(steps[t][ids[t]].logprob for t in range(1, len(ids)))
