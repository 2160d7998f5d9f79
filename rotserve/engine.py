"""RotServeEngine: one vLLM engine, each prompt under its own steering (angle, plane, window).

    with RotServeEngine("Qwen/Qwen2.5-7B-Instruct", "plane.safetensors", dtype="bfloat16") as eng:
        for c in eng.generate(["How do I pick a lock?"] * 3, angles=[None, 90.0, 210.0]):
            print(c.angle, c.generation)

Plane, layers and sites are checked before the slow engine start (the one set-up path,
rotserve.steering.prepare_steering); each steered prompt gets its own prefix-cache salt; a
steered engine runs the start-up canary (rotserve.canary) and refuses to serve if it fails.
"""

from __future__ import annotations

import gc
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotserve.canary import CanaryReport, llm_executor, run_canary
from rotserve.dtype import choose_dtype, gpu_in_sight
from rotserve.logprobs import chosen_logprobs, prompt_token_logprobs
from rotserve.plane import Plane
from rotserve.prompts import chat_prompt
from rotserve.steering import (
    RequestSteering,
    ResolvedSteering,
    RotServeConfigError,
    SteeringSetup,
    parse_request,
    prepare_steering,
)


@dataclass(frozen=True)
class Completion:
    """One completion of one instruction under one steering (n > 1: one per sample)."""

    instruction: str
    prompt: str  # what the model was given (the chat template applied, unless chat=False)
    angle: float | None  # degrees; None = unsteered
    adaptive: bool
    mode: str  # absolute | relative
    sample: int  # 0..n-1
    generation: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str | None
    logprobs: tuple[float, ...] | None = None  # of each generated token, when asked for
    prompt_token_ids: tuple[int, ...] = ()
    plane: str | None = None  # the plane's name on this engine; None = unsteered
    plane_id: str | None = None
    layers: tuple[int, ...] = ()  # the steered layers (absolute); () = unsteered

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)


class RotServeEngine:
    """A vllm.LLM serving a rotated model (or the stock model when plane is None)."""

    def __init__(
        self,
        model: str | Path,
        plane: str | Path | None = None,
        dtype: str = "auto",
        layers: Sequence[int] | None = None,
        sites: Sequence[str] | None = None,
        enable_prefix_caching: bool = True,
        canary: bool = True,
        *,
        planes: Mapping[str, str | Path] | None = None,
        max_planes: int | None = None,
        steerable_layers: Sequence[int] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        """`plane` (one file) or `planes` (name -> file, the first is the default): each
        request then picks its plane, layer window and sites (generate's plane/layers/sites).
        `layers`/`sites` are the default window; `steerable_layers` bounds the windows a
        request may name (default every layer)."""
        self.model = str(model)
        self.setup: SteeringSetup | None = None
        hf_overrides = dict(llm_kwargs.pop("hf_overrides", None) or {})
        logits_processors = list(llm_kwargs.pop("logits_processors", None) or [])
        if plane is not None or planes is not None:
            self.setup = prepare_steering(
                self.model,
                plane,
                layers=layers,
                sites=sites,
                revision=llm_kwargs.get("revision"),
                planes=planes,
                max_planes=max_planes,
                steerable_layers=steerable_layers,
            )
            hf_overrides = self.setup.hf_overrides(hf_overrides)
            logits_processors = self.setup.logits_processors(logits_processors)
        elif layers is not None or sites is not None:
            raise RotServeConfigError("layers/sites given but no plane: nothing to steer")

        self.dtype_choice = choose_dtype(dtype, gpu=gpu_in_sight())
        if dtype == "auto":
            print(f"rotserve: {self.dtype_choice.describe()}", file=sys.stderr)

        from vllm import LLM

        self.llm: Any = LLM(
            model=self.model,
            dtype=self.dtype_choice.dtype,
            enable_prefix_caching=enable_prefix_caching,
            hf_overrides=hf_overrides or None,
            logits_processors=logits_processors or None,
            **llm_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.canary: CanaryReport | None = None
        if self.setup is not None and canary:
            self.canary = run_canary(llm_executor(self.llm), self.vllm_config)
            if not self.canary.ok:
                self.close()
                self.canary.raise_if_failed()

    def info(self) -> dict[str, Any]:
        """What a job's manifest records of this engine: its dtype (and why), and the
        start-up canary's time and stack when it ran."""
        choice = self.dtype_choice
        info: dict[str, Any] = {"dtype": choice.dtype, "dtype_reason": choice.reason}
        if self.canary is not None:  # the engine refused to start if it failed
            info["canary"] = {"seconds": round(self.canary.seconds, 3), **self.canary.stack}
        return info

    @property
    def vllm_config(self) -> Any:
        return self.llm.llm_engine.vllm_config

    @property
    def plane(self) -> Plane | None:
        return self.setup.plane if self.setup is not None else None

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        instructions: Sequence[str],
        angles: Sequence[float | None],
        adaptive: bool | Sequence[bool] = False,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        n: int = 1,
        chat: bool = True,
        mode: str | Sequence[str] = "absolute",
        logprobs: bool = False,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        stop: Sequence[str] | None = None,
        plane: str | None | Sequence[str | None] = None,
        layers: Any = None,
        sites: Sequence[str] | None | Sequence[Sequence[str] | None] = None,
    ) -> list[Completion]:
        """One angle per instruction (None = unsteered); one Completion per sample.

        `mode`, `plane` (a name or plane id of this engine), `layers` (a window: "all", "none",
        "a:b", "3,4,5" or a list of ints) and `sites` are shared or given one per
        instruction (a list as long as `instructions`); None = the engine's default. Every
        combination runs in the same batch.

        Completions come in instruction order (with n > 1, the n samples of an instruction
        are consecutive, numbered by `sample`). `chat=True` applies the tokenizer's chat
        template (one user turn, generation prompt added); `chat=False` sends instructions
        verbatim. `ignore_eos` and `min_tokens` force lengths (benchmarks need equal work).
        """
        from vllm import SamplingParams

        instructions = list(instructions)
        steerings = self._request_steerings(
            len(instructions), angles, adaptive, mode, plane, layers, sites
        )
        resolved = [self._resolve(st, i) if st.active else None for i, st in enumerate(steerings)]
        prompts = [
            _engine_prompt(chat_prompt(self.tokenizer, text) if chat else text, res)
            for text, res in zip(instructions, resolved, strict=True)
        ]
        sampling = {
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "min_tokens": min_tokens,
            "ignore_eos": ignore_eos,
            "stop": list(stop) if stop else None,
            "seed": seed,
            "logprobs": 0 if logprobs else None,
        }
        params = [SamplingParams(**sampling, extra_args=_extra_args(st)) for st in steerings]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            completion
            for text, prompt, steering, res, out in zip(
                instructions, prompts, steerings, resolved, outputs, strict=True
            )
            for completion in self._completions(
                text, prompt["prompt"], steering, res, out, logprobs
            )
        ]

    def _request_steerings(
        self,
        count: int,
        angles: Sequence[float | None],
        adaptive: bool | Sequence[bool],
        mode: str | Sequence[str],
        plane: str | None | Sequence[str | None],
        layers: Any,
        sites: Sequence[str] | None | Sequence[Sequence[str] | None],
    ) -> list[RequestSteering]:
        """generate's steering arguments, each shared or one per instruction, as one checked
        RequestSteering per instruction."""
        angles = list(angles)
        if len(angles) != count:
            raise ValueError(
                f"{count} instructions but {len(angles)} angles: give one angle "
                f"(or None) per instruction"
            )
        flags = [adaptive] * count if _is_flag(adaptive) else list(adaptive)
        if len(flags) != count:
            raise ValueError(f"{len(flags)} adaptive flags for {count} instructions")
        planes = _per_prompt(plane, count, "plane", lambda v: v is None or isinstance(v, str))
        windows = _per_prompt(layers, count, "layers", _is_window)
        site_sets = _per_prompt(
            sites, count, "sites", lambda v: v is None or isinstance(v, str) or _is_str_list(v)
        )
        modes = _per_prompt(mode, count, "mode", lambda v: isinstance(v, str))
        return [
            self._steering(a, f, modes[i], i, planes[i], windows[i], site_sets[i])
            for i, (a, f) in enumerate(zip(angles, flags, strict=True))
        ]

    def _completions(
        self,
        instruction: str,
        prompt: str,
        steering: RequestSteering,
        resolved: ResolvedSteering | None,
        output: Any,
        logprobs: bool,
    ) -> list[Completion]:
        """One Completion per sample of one vLLM RequestOutput."""
        prompt_token_ids = tuple(output.prompt_token_ids or ())
        return [
            Completion(
                instruction=instruction,
                prompt=prompt,
                angle=steering.angle,
                adaptive=steering.adaptive,
                mode=steering.mode,
                sample=j,
                generation=comp.text,
                token_ids=tuple(comp.token_ids),
                prompt_tokens=len(prompt_token_ids),
                prompt_token_ids=prompt_token_ids,
                finish_reason=comp.finish_reason,
                logprobs=chosen_logprobs(comp) if logprobs else None,
                plane=None if resolved is None else self._plane_name(resolved.slot),
                plane_id=None if resolved is None else resolved.plane_id,
                layers=() if resolved is None else resolved.layers,
            )
            for j, comp in enumerate(output.outputs)
        ]

    def continuation_logprobs(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        continuation_token_ids: Sequence[Sequence[int]],
        angles: Sequence[float | None] | None = None,
        adaptive: bool = False,
        mode: str = "absolute",
    ) -> list[tuple[float, ...]]:
        """Log-prob of each continuation token given the prompt and the tokens before it.

        Teacher-forced in one batch of prefills (vLLM's prompt log-probs over prompt +
        continuation); angles None = the unsteered model, which is how coherence scores a
        steered generation. Each request gets a fresh prefix-cache salt: log-probs are computed,
        never read back from another request's cache.
        """
        from vllm import SamplingParams

        n = len(prompt_token_ids)
        if len(continuation_token_ids) != n:
            raise ValueError(f"{n} prompts but {len(continuation_token_ids)} continuations")
        angles = list(angles) if angles is not None else [None] * n
        if len(angles) != n:
            raise ValueError(f"{n} prompts but {len(angles)} angles")
        salt = uuid.uuid4().hex
        prompts, params, todo = [], [], []
        for i, (prompt, cont, angle) in enumerate(
            zip(prompt_token_ids, continuation_token_ids, angles, strict=True)
        ):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: a continuation needs a prompt")
            if not cont:
                continue  # nothing to score
            steering = self._steering(angle, adaptive, mode, i)
            todo.append(i)
            prompts.append({"prompt_token_ids": [*prompt, *cont], "cache_salt": f"{salt}-{i}"})
            params.append(
                SamplingParams(
                    max_tokens=1,
                    prompt_logprobs=0,
                    extra_args=_extra_args(steering),
                )
            )
        scores: list[tuple[float, ...]] = [()] * n
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        for i, out in zip(todo, outputs, strict=True):
            # prompt_token_logprobs starts at token 1: the continuation starts at len(prompt) - 1
            scores[i] = prompt_token_logprobs(out)[len(prompt_token_ids[i]) - 1 :]
        return scores

    def _steering(
        self,
        angle: Any,
        adaptive: Any,
        mode: str,
        index: int,
        plane: Any = None,
        layers: Any = None,
        sites: Any = None,
    ) -> RequestSteering:
        if angle is not None and self.plane is None:
            raise RotServeConfigError(
                f"prompt {index} asks for angle {angle!r} but this engine has no plane "
                f"(RotServeEngine(model, plane=None) serves the stock model)"
            )
        fields = {"angle": angle, "adaptive": adaptive, "mode": mode}
        for key, value in (("plane", plane), ("layers", layers), ("sites", sites)):
            if value is not None:
                fields[key] = value
        try:
            return parse_request({"rotserve": fields})
        except ValueError as e:
            raise type(e)(f"prompt {index}: {e}") from None

    def _resolve(self, steering: RequestSteering, index: int) -> ResolvedSteering:
        assert self.setup is not None
        try:
            return self.setup.resolve(steering)
        except ValueError as e:
            raise type(e)(f"prompt {index}: {e}") from None

    def _plane_name(self, slot: int) -> str:
        assert self.setup is not None
        return self.setup.settings.plane_names[slot]

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Shut the engine (and its worker processes) down; idempotent."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del llm
        gc.collect()

    def __enter__(self) -> RotServeEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _engine_prompt(prompt: str, resolved: ResolvedSteering | None) -> dict[str, Any]:
    """vLLM's prompt dict; a steered prompt carries its steering's prefix-cache salt."""
    item: dict[str, Any] = {"prompt": prompt}
    salt = resolved.cache_salt() if resolved is not None else None
    if salt is not None:
        item["cache_salt"] = salt
    return item


def _extra_args(steering: RequestSteering) -> dict[str, Any] | None:
    """SamplingParams.extra_args carrying the steering to the plugin; None when unsteered."""
    return steering.as_extra_args() if steering.active else None


def _per_prompt(value: Any, n: int, name: str, is_one: Any) -> list[Any]:
    """A value shared by every prompt, or a list of one per prompt."""
    if is_one(value):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} values for {n} instructions: give one or one each")
    return values


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


def _is_window(value: Any) -> bool:
    """One layer window (None, a spec string, an int or a list of ints), not a list of them."""
    if value is None or isinstance(value, str | int):
        return True
    return isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _is_flag(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"
