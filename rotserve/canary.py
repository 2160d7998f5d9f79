"""The start-up canary: proof, on this engine, that steering is live in prefill AND decode.

Every steered engine runs it once after vLLM has started and refuses to serve if it fails
(docs/DESIGN.md). Three tiny engine calls (the batch, alone and refeed probes), each probe
salted apart; `check_probes` turns their results into checks, purely, so only the executor
differs between a `vllm.LLM` (`run_canary`) and the server's async engine client
(`run_canary_async`).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rotserve.logprobs import chosen_logprobs, prompt_token_logprobs
from rotserve.steering import UNSTEERED, RequestSteering

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Once upon a time"
PROBE_STEERINGS = (
    UNSTEERED,
    RequestSteering(angle=90.0),
    RequestSteering(angle=200.0, adaptive=True),
)
PROBE_TOKENS = 4  # the first comes from prefill, the other three from decode steps


def tolerance(dtype: str) -> float:
    """Largest |log-prob difference| that is numerical noise, not a steering bug.

    float32 on CPU measured 2.5e-5 over 30 layers (HF vs vLLM); half precision kernels
    differ between batch shapes and between prefill and decode by up to a few hundredths.
    """
    return 1e-3 if dtype in ("float32", "torch.float32") else 0.1


@dataclass(frozen=True)
class Probe:
    prompt: str | tuple[int, ...]  # text (the first call) or token ids (the re-run)
    steering: RequestSteering
    max_tokens: int
    salt: str


@dataclass(frozen=True)
class ProbeResult:
    prompt_token_ids: tuple[int, ...]
    prompt_logprobs: tuple[float, ...]  # of prompt tokens 1..n-1 (token 0 has none)
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # of each generated token


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class CanaryReport:
    checks: tuple[Check, ...]
    stack: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def describe_stack(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.stack.items())

    def raise_if_failed(self) -> None:
        if self.ok:
            return
        reasons = "; ".join(f"{c.name}: {c.detail}" for c in self.failures())
        raise CanaryError(
            f"rotserve canary failed on this stack ({self.describe_stack()}): {reasons}. "
            "Steering is not right here, so the engine refuses to serve; run `rotserve "
            "selftest` for the full diagnosis, and try enforce_eager=True or "
            'compilation_config={"cudagraph_mode": "PIECEWISE"} to isolate the runner mode'
        )


class CanaryError(RuntimeError):
    """The engine steers wrongly (or not at all) on this stack."""


# -- the probes ------------------------------------------------------------------------------


def first_probes(nonce: str, tokens: int = PROBE_TOKENS) -> list[Probe]:
    return [
        Probe(PROBE_TEXT, s, tokens, f"rotserve-canary-{nonce}-{i}")
        for i, s in enumerate(PROBE_STEERINGS)
    ]


def alone_probes(first: Sequence[Probe], nonce: str) -> list[Probe]:
    """The first probes again, salted apart from them (a prefix-cache hit would make "alone"
    trivially equal to "batch")."""
    return [Probe(p.prompt, p.steering, p.max_tokens, f"{p.salt}-alone-{nonce}") for p in first]


def refeed_probes(first: Sequence[Probe], results: Sequence[ProbeResult]) -> list[Probe]:
    """Each probe's prompt + generation as a prompt, under its own steering and unsteered
    (for the unsteered probe both are unsteered: the numerical noise floor of the re-run)."""
    probes = []
    for p, r in zip(first, results, strict=True):
        ids = r.prompt_token_ids + r.token_ids
        probes.append(Probe(ids, p.steering, 1, f"{p.salt}-refeed"))
        probes.append(Probe(ids, UNSTEERED, 1, f"{p.salt}-refeed-unsteered"))
    return probes


def sampling_params(probe: Probe) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0,
        max_tokens=probe.max_tokens,
        ignore_eos=True,  # every probe generates exactly max_tokens tokens
        logprobs=0,
        prompt_logprobs=0,
        extra_args=probe.steering.as_extra_args() if probe.steering.active else None,
    )


def engine_prompt(probe: Probe) -> dict[str, Any]:
    if isinstance(probe.prompt, str):
        return {"prompt": probe.prompt, "cache_salt": probe.salt}
    return {"prompt_token_ids": list(probe.prompt), "cache_salt": probe.salt}


def probe_result(output: Any) -> ProbeResult:
    """A vLLM RequestOutput (with prompt and sample log-probs) as plain numbers."""
    comp = output.outputs[0]
    return ProbeResult(
        tuple(output.prompt_token_ids or ()),
        prompt_token_logprobs(output),
        tuple(comp.token_ids),
        chosen_logprobs(comp),
    )


# -- the checks (pure) -----------------------------------------------------------------------


def _worst(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def check_probes(
    probes: Sequence[Probe],
    batch: Sequence[ProbeResult],
    alone: Sequence[ProbeResult],
    refeed: Sequence[ProbeResult],
    tol: float,
) -> tuple[Check, ...]:
    """The canary's three checks; `refeed` as refeed_probes orders it.

    - prefill is steered: the steered probes' prompt log-probs differ from the unsteered one's;
    - a mixed batch equals each request alone: the token-to-request mapping is right;
    - decode is steered: the log-prob of each token a decode step produced equals its log-prob
      in the steered re-run of the whole sequence (a runner that replays decode steps without
      the per-token table fails here), and for at least one probe the steered and unsteered
      re-runs differ by more than the noise.

    "Steering changed something" is compared with the noise measured in the same run (batch vs
    alone; the unsteered probe's decode vs its re-run), not with a fixed threshold: a weak
    plane on a small model in bfloat16 moves log-probs by a tenth of a nat, which is still ten
    times the numerical noise. Agreement (batch vs alone, decode vs re-run) is compared with
    the dtype's tolerance.
    """
    rows = list(zip(probes, batch, alone, refeed[0::2], refeed[1::2], strict=True))
    base = next(b for p, b, *_ in rows if not p.steering.active)

    def decode_part(run: ProbeResult, of: ProbeResult) -> tuple[float, ...]:
        # prompt log-prob index of generated token j is n - 1 + j; tokens j >= 1 came from
        # decode steps (token 0 from the prefill)
        return run.prompt_logprobs[len(of.prompt_token_ids) :]

    gaps, token_mismatch = [], []
    for p, b, a, *_ in rows:
        gap = _worst(b.prompt_logprobs, a.prompt_logprobs)
        if b.token_ids == a.token_ids:
            gap = max(gap, _worst(b.logprobs, a.logprobs))
        elif tol < 0.01:  # float32: greedy tokens must be identical too
            token_mismatch.append(_label(p.steering))
        gaps.append(gap)
    mixed = Check(
        "a mixed batch equals each request alone",
        all(g <= tol for g in gaps) and not token_mismatch,
        f"max |batch - alone| log-prob {max(gaps):.3g} (tolerance {tol:.3g})"
        + (f"; different tokens at {', '.join(token_mismatch)}" if token_mismatch else ""),
    )

    prefill_noise = 2 * max(gaps) + 1e-6
    moved = [
        _worst(b.prompt_logprobs, base.prompt_logprobs) for p, b, *_ in rows if p.steering.active
    ]
    prefill = Check(
        "prefill is steered",
        all(m > prefill_noise for m in moved),
        "steered vs unsteered prompt log-probs differ by up to "
        + ", ".join(f"{m:.3g}" for m in moved)
        + f" (must exceed twice the batch-vs-alone noise: {prefill_noise:.3g})",
    )

    unsteered_row = next(r for r in rows if not r[0].steering.active)
    _, ub, _, u_same, _ = unsteered_row
    decode_noise = 2 * _worst(ub.logprobs[1:], decode_part(u_same, ub)) + 1e-6
    same_gaps, powers, closer = [], [], []
    for p, b, _, same, other in rows:
        if not p.steering.active:
            continue
        want, unsteered = decode_part(same, b), decode_part(other, b)
        same_gaps.append(_worst(b.logprobs[1:], want))
        powers.append(_worst(want, unsteered))
        closer.append(same_gaps[-1] < powers[-1] / 2)
    # Unsteered decode would move every steered probe off its steered re-run towards the
    # unsteered one; the probe that steering moves most shows it (a greedy token can be so
    # likely that a weak steering barely moves its log-prob).
    strongest = max(range(len(powers)), key=powers.__getitem__)
    decode_ok = (
        all(g <= tol for g in same_gaps) and powers[strongest] > decode_noise and closer[strongest]
    )
    decode = Check(
        "decode is steered",
        decode_ok,
        f"decode-step vs steered re-run log-probs differ by up to {max(same_gaps):.3g} "
        f"(tolerance {tol:.3g}); steered vs unsteered re-run by up to "
        + ", ".join(f"{m:.3g}" for m in powers)
        + f" (one must exceed twice the decode-vs-re-run noise: {decode_noise:.3g})",
    )
    return prefill, mixed, decode


def _label(s: RequestSteering) -> str:
    if s.angle is None:
        return "unsteered"
    return f"{s.angle:g}°{' adaptive' if s.adaptive else ''}"


# -- running it ------------------------------------------------------------------------------


def describe_stack(vllm_config: Any) -> dict[str, Any]:
    """Which runner, compilation and CUDA-graph mode this engine runs (what selftest prints)."""
    compilation = vllm_config.compilation_config
    model_config = vllm_config.model_config
    mode = getattr(compilation, "mode", None)
    graphs = getattr(compilation, "cudagraph_mode", None)
    return {
        "device": str(getattr(vllm_config.device_config, "device_type", "?")),
        "runner": "V2" if getattr(vllm_config, "use_v2_model_runner", False) else "V1",
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "enforce_eager": bool(model_config.enforce_eager),
        "compilation": getattr(mode, "name", str(mode)),
        "cudagraph_mode": getattr(graphs, "name", str(graphs)),
    }


Execute = Callable[[Sequence[Probe]], Sequence[ProbeResult]]
AsyncExecute = Callable[[Sequence[Probe]], Awaitable[Sequence[ProbeResult]]]
_Steps = Generator[list[Probe], list[ProbeResult], tuple[Check, ...]]


def _steps(vllm_config: Any, tokens: int) -> _Steps:
    """The canary as a conversation: yields each batch of probes, receives its results."""
    nonce = uuid.uuid4().hex[:12]
    probes = first_probes(nonce, tokens)
    batch = yield probes
    alone = []
    for p in alone_probes(probes, nonce):
        alone.append((yield [p])[0])
    refeed = yield refeed_probes(probes, batch)
    return check_probes(
        probes, batch, alone, refeed, tolerance(describe_stack(vllm_config)["dtype"])
    )


def run_canary(execute: Execute, vllm_config: Any, tokens: int = PROBE_TOKENS) -> CanaryReport:
    """Run the probes through `execute` (one call = one batch) and check their results."""
    t0 = time.perf_counter()
    steps = _steps(vllm_config, tokens)
    try:
        probes = next(steps)
        while True:
            probes = steps.send(list(execute(probes)))
    except StopIteration as done:
        checks = done.value
    return CanaryReport(checks, describe_stack(vllm_config), time.perf_counter() - t0)


async def run_canary_async(
    execute: AsyncExecute, vllm_config: Any, tokens: int = PROBE_TOKENS
) -> CanaryReport:
    """run_canary for an async engine (the server's): same probes, same checks."""
    t0 = time.perf_counter()
    steps = _steps(vllm_config, tokens)
    try:
        probes = next(steps)
        while True:
            probes = steps.send(list(await execute(probes)))
    except StopIteration as done:
        checks = done.value
    return CanaryReport(checks, describe_stack(vllm_config), time.perf_counter() - t0)


def llm_executor(llm: Any) -> Execute:
    """Probes through a `vllm.LLM`: one generate call per batch."""

    def execute(probes: Sequence[Probe]) -> list[ProbeResult]:
        outs = llm.generate(
            [engine_prompt(p) for p in probes],
            [sampling_params(p) for p in probes],
            use_tqdm=False,
        )
        return [probe_result(o) for o in outs]

    return execute


def async_executor(engine_client: Any) -> AsyncExecute:
    """Probes through vLLM's async engine client: submitted together, so they share steps."""
    import asyncio

    async def one(probe: Probe) -> ProbeResult:
        final = None
        request_id = f"{probe.salt}-{uuid.uuid4().hex[:8]}"
        async for out in engine_client.generate(
            engine_prompt(probe), sampling_params(probe), request_id
        ):
            final = out
        assert final is not None
        return probe_result(final)

    async def execute(probes: Sequence[Probe]) -> list[ProbeResult]:
        return list(await asyncio.gather(*(one(p) for p in probes)))

    return execute
