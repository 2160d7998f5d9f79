"""The start-up canary: proof, on this engine, that steering is live in prefill AND decode.

Every steered engine runs it once after vLLM has started and refuses to serve if it fails
(docs/DESIGN.md). Three tiny engine calls (the batch, alone and refeed probes), each probe
salted apart; the probes cover a second plane and a narrowed layer window when the engine
holds them (`probe_steerings`, from the engine's config). `check_probes` turns their results
into checks, purely, so only the executor differs between a `vllm.LLM` (`run_canary`) and the
server's async engine client (`run_canary_async`).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rotserve.logprobs import chosen_logprobs, prompt_token_logprobs
from rotserve.steering import (
    SETTINGS_KEY,
    UNSTEERED,
    EngineSteering,
    RequestSteering,
    canonical_window,
)

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Once upon a time"
PROBE_STEERINGS = (
    UNSTEERED,
    RequestSteering(angle=90.0),
    RequestSteering(angle=200.0, adaptive=True),
)
# The first comes from prefill, the other seven from decode steps: enough decode tokens per
# probe for a trimmed statistic to shrug off a few noisy ones (see typical_gap).
PROBE_TOKENS = 8
# The share of per-token gaps typical_gap drops (the largest ones, rounded up).
TRIM = 1 / 3
# Added to every "must exceed" threshold, so "no difference at all" fails even with no noise.
FLOOR = 1e-6


def tolerance(dtype: str) -> float:
    """Largest log-prob gap between two runs of the same request that is numerical noise.

    float32 on CPU measured 2.5e-5 over 30 layers (HF vs vLLM): there it bounds the largest
    gap. In half precision it bounds the typical gap (typical_gap): GPU bf16 kernels are not
    batch-invariant, so a few tokens of any request move by up to half a nat between batch
    shapes, while a typical gap stays at a few hundredths.
    """
    return 1e-3 if dtype in ("float32", "torch.float32") else 0.1


def _strict(tol: float) -> bool:
    """float32's tolerance: the largest gap and identical greedy tokens, not a typical gap."""
    return tol < 0.01


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
    # How far from failing, in nats of log-prob gap: the smallest slack of the check's
    # conditions (a tolerance minus a gap, or a gap minus what it must exceed); >= 0 passes.
    # None for checks that are not the canary's (parity, steering power).
    margin: float | None = None


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

    def margins(self) -> dict[str, float | None]:
        """Each check's margin by name (nats; >= 0 passes): what a report over many runs
        collects to see how close a correct engine comes to refusing."""
        return {c.name: c.margin for c in self.checks}

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


def probe_steerings(
    settings: EngineSteering | None = None, num_layers: int = 0
) -> tuple[RequestSteering, ...]:
    """PROBE_STEERINGS, then what this engine holds beyond its default: its second plane, and
    a narrowed window (the later half of the default layers; with one default layer, its
    last default site alone), each at the angle of PROBE_STEERINGS[1], which they must
    differ from. From the engine's settings alone: what the driver knows, never a worker."""
    steerings = list(PROBE_STEERINGS)
    if settings is None:
        return tuple(steerings)
    twin = PROBE_STEERINGS[1]
    if len(settings.planes) > 1:
        steerings.append(replace(twin, plane=settings.plane_names[1]))
    layers = settings.chosen_layers(num_layers)
    if len(layers) > 1:
        # The later half: on the toy refusal model it differs from both the full window and
        # from no steering by ~0.3-1 nat typical gaps; the earlier half is close to full.
        later = layers[len(layers) // 2 :]
        contiguous = later == list(range(later[0], later[-1] + 1))
        window = f"{later[0]}:{later[-1] + 1}" if contiguous else canonical_window(later)
        steerings.append(replace(twin, window=window))
    elif len(settings.sites) > 1:
        steerings.append(replace(twin, sites=settings.sites[-1:]))
    return tuple(steerings)


def engine_steering(vllm_config: Any) -> tuple[EngineSteering, int] | None:
    """A steered engine's settings and layer count from its vLLM config (the model config's
    hf_config carries hf_overrides["rotserve"]); None if it has none (an unsteered engine)."""
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    raw = getattr(hf_config, SETTINGS_KEY, None)
    if raw is None:
        return None
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return EngineSteering.from_dict(raw), int(text.num_hidden_layers)


def first_probes(
    nonce: str,
    tokens: int = PROBE_TOKENS,
    steerings: Sequence[RequestSteering] = PROBE_STEERINGS,
) -> list[Probe]:
    return [
        Probe(PROBE_TEXT, s, tokens, f"rotserve-canary-{nonce}-{i}")
        for i, s in enumerate(steerings)
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


def worst_gap(a: Sequence[float], b: Sequence[float]) -> float:
    """The largest |a - b| over tokens (inf if the lengths differ)."""
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def typical_gap(a: Sequence[float], b: Sequence[float]) -> float:
    """The mean |a - b| over tokens after dropping the largest TRIM of them (rounded up,
    keeping at least one); inf if the lengths differ.

    A steering fault moves most of a request's tokens, kernel noise a few: GPU bf16 moves
    ~5% of tokens by more than 0.1 nat between batch shapes, a few by 0.5, so a maximum
    over ~30 tokens is dominated by them while this mean is not.
    """
    if len(a) != len(b):
        return math.inf
    gaps = sorted(abs(x - y) for x, y in zip(a, b, strict=True))
    if not gaps:
        return 0.0
    kept = gaps[: max(1, len(gaps) - math.ceil(len(gaps) * TRIM))]
    return sum(kept) / len(kept)


def _common_prefix(a: ProbeResult, b: ProbeResult) -> int:
    n = 0
    while n < min(len(a.token_ids), len(b.token_ids)) and a.token_ids[n] == b.token_ids[n]:
        n += 1
    return n


def _compared(a: ProbeResult, b: ProbeResult) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The log-probs two runs of one prompt share: every prompt token, and each generated
    token up to the first where their greedy tokens part (half precision may break a tie
    differently)."""
    n = _common_prefix(a, b)
    return a.prompt_logprobs + a.logprobs[:n], b.prompt_logprobs + b.logprobs[:n]


def nearer(x: Sequence[float], own: Sequence[float], other: Sequence[float]) -> float:
    """How much nearer `x` is to `own` than to `other` (typical gaps, nats): >= 0 when a
    run is told to belong to its own request rather than to another one."""
    return typical_gap(x, other) - typical_gap(x, own) - FLOOR


def _check(name: str, margin: float, detail: str) -> Check:
    return Check(name, margin >= 0, f"{detail} [margin {margin:.3g}]", margin)


def check_probes(
    probes: Sequence[Probe],
    batch: Sequence[ProbeResult],
    alone: Sequence[ProbeResult],
    refeed: Sequence[ProbeResult],
    tol: float,
) -> tuple[Check, ...]:
    """The canary's checks; `refeed` as refeed_probes orders it. Each check has a margin in
    nats (>= 0 passes). Gaps are typical_gap's, except where float32 is strict (below).

    - a mixed batch equals each request alone: each probe's batch and alone runs agree
      (float32: largest gap <= tol and the same greedy tokens; half precision: typical gap
      <= tol), and its batch prompt log-probs are nearer its own alone run than any other
      probe's (`nearer`: rows handed to the wrong request land nearer another's);
    - prefill is steered: each steered probe's prompt log-probs are farther from the
      unsteered probe's than twice the noise N, N the largest batch-vs-alone gap of the run;
    - decode is steered: the log-probs of the tokens decode steps produced agree with the
      steered re-run of the whole sequence (as above), and for the probe whose steered and
      unsteered re-runs differ most, they differ by more than twice the unsteered probe's
      decode-vs-re-run gap, and its decode steps are nearer the steered re-run than the
      unsteered one;
    - a second plane / a narrowed window steers differently (when probed): its prompt
      log-probs are farther from the same angle on the default plane and window than 2 N.

    "Changed something" is compared with the noise the same run measures, never a fixed
    threshold: a weak plane on a small model in bfloat16 moves log-probs by a tenth of a nat,
    still ten times its noise. A fault that raises the measured noise only raises the bar.
    """
    tight = _strict(tol)
    rows = list(zip(probes, batch, alone, refeed[0::2], refeed[1::2], strict=True))
    unsteered = next(i for i, p in enumerate(probes) if not p.steering.active)
    checks = [
        _mixed(rows, tol, tight),
        _prefill(rows, unsteered),
        _decode(rows, unsteered, tol, tight),
    ]
    for name, kind in (
        ("a second plane steers differently", "plane"),
        ("a narrowed window steers differently", "window"),
    ):
        probed = [i for i, (p, *_) in enumerate(rows) if _kind(p.steering) == kind]
        if probed:
            checks.append(_differs(name, rows, probed[0]))
    return tuple(checks)


Row = tuple[Probe, ProbeResult, ProbeResult, ProbeResult, ProbeResult]


def _noise(rows: Sequence[Row]) -> float:
    """The run's noise: the largest typical batch-vs-alone gap of the prompt log-probs."""
    return max(typical_gap(b.prompt_logprobs, a.prompt_logprobs) for _, b, a, *_ in rows)


def _mixed(rows: Sequence[Row], tol: float, tight: bool) -> Check:
    agree, mismatch, margins, apart = [], [], [], []
    for i, (p, b, a, *_) in enumerate(rows):
        mine, theirs = _compared(b, a)
        gap = worst_gap(mine, theirs) if tight else typical_gap(mine, theirs)
        agree.append(gap)
        margins.append(tol - gap)
        if tight and b.token_ids != a.token_ids:  # float32: greedy tokens must be identical
            mismatch.append(_label(p.steering))
            margins.append(-math.inf)
        for j, (q, _, other, *_) in enumerate(rows):
            if j != i and q.steering != p.steering:
                apart.append(nearer(b.prompt_logprobs, a.prompt_logprobs, other.prompt_logprobs))
    measure = "largest" if tight else "typical"
    return _check(
        "a mixed batch equals each request alone",
        min(margins + apart),
        f"{measure} |batch - alone| log-prob gap up to {max(agree):.3g} (tolerance {tol:.3g})"
        + (f"; different tokens at {', '.join(mismatch)}" if mismatch else "")
        + "; each batch run is nearer its own alone run than any other probe's, by at least "
        f"{min(apart, default=math.inf):.3g}",
    )


def _prefill(rows: Sequence[Row], unsteered: int) -> Check:
    noise = _noise(rows)
    base = rows[unsteered][1]
    moved = [
        typical_gap(b.prompt_logprobs, base.prompt_logprobs)
        for p, b, *_ in rows
        if p.steering.active
    ]
    return _check(
        "prefill is steered",
        min(moved) - 2 * noise - FLOOR,
        "steered vs unsteered prompt log-probs differ by typical gaps of "
        + ", ".join(f"{m:.3g}" for m in moved)
        + f" (each must exceed twice the batch-vs-alone noise: {2 * noise:.3g})",
    )


def _decode(rows: Sequence[Row], unsteered: int, tol: float, tight: bool) -> Check:
    def decode_part(run: ProbeResult, of: ProbeResult) -> tuple[float, ...]:
        # prompt log-prob index of generated token j is n - 1 + j; tokens j >= 1 came from
        # decode steps (token 0 from the prefill)
        return run.prompt_logprobs[len(of.prompt_token_ids) :]

    _, ub, _, u_same, _ = rows[unsteered]
    noise = typical_gap(ub.logprobs[1:], decode_part(u_same, ub))
    agree, powers, nearest = [], [], []
    for p, b, _, same, other in rows:
        if not p.steering.active:
            continue
        got, want, off = b.logprobs[1:], decode_part(same, b), decode_part(other, b)
        agree.append(worst_gap(got, want) if tight else typical_gap(got, want))
        powers.append(typical_gap(want, off))
        nearest.append(nearer(got, want, off))
    # Unsteered decode would move every steered probe off its steered re-run towards the
    # unsteered one; the probe that steering moves most shows it (a greedy token can be so
    # likely that a weak steering barely moves its log-prob).
    strongest = max(range(len(powers)), key=powers.__getitem__)
    margin = min(tol - max(agree), powers[strongest] - 2 * noise - FLOOR, nearest[strongest])
    measure = "largest" if tight else "typical"
    return _check(
        "decode is steered",
        margin,
        f"decode-step vs steered re-run log-probs: {measure} gap up to {max(agree):.3g} "
        f"(tolerance {tol:.3g}); steered vs unsteered re-run typical gaps "
        + ", ".join(f"{m:.3g}" for m in powers)
        + f" (one must exceed twice the decode-vs-re-run noise: {2 * noise:.3g}, and its "
        f"decode steps be nearer the steered re-run than the unsteered: by "
        f"{nearest[strongest]:.3g})",
    )


def _differs(name: str, rows: Sequence[Row], probed: int) -> Check:
    """The probe's prompt log-probs against its twin's: the same angle and mode on the
    engine's default plane, window and sites."""
    p, b, *_ = rows[probed]
    default = replace(p.steering, plane=None, window=None, sites=None)
    twin = next(r for r in rows if r[0].steering == default)
    noise = _noise(rows)
    gap = typical_gap(b.prompt_logprobs, twin[1].prompt_logprobs)
    return _check(
        name,
        gap - 2 * noise - FLOOR,
        f"{_label(p.steering)} vs {_label(default)}: prompt log-probs differ by a typical gap "
        f"of {gap:.3g} (must exceed twice the batch-vs-alone noise: {2 * noise:.3g})",
    )


def _kind(s: RequestSteering) -> str:
    if s.plane is not None:
        return "plane"
    if s.window is not None or s.sites is not None:
        return "window"
    return "default"


def _label(s: RequestSteering) -> str:
    if s.angle is None:
        return "unsteered"
    label = f"{s.angle:g}°{' adaptive' if s.adaptive else ''}"
    if s.plane is not None:
        label += f" plane {s.plane}"
    if s.window is not None:
        label += f" layers {s.window}"
    if s.sites is not None:
        label += f" sites {','.join(s.sites)}"
    return label


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
    held = engine_steering(vllm_config)
    probes = first_probes(nonce, tokens, probe_steerings(*held) if held else PROBE_STEERINGS)
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
