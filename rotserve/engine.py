"""RotServeEngine: one vLLM engine, one plane, a different rotation angle per prompt.

    with RotServeEngine("Qwen/Qwen2.5-7B-Instruct", "plane.safetensors", dtype="bfloat16") as eng:
        rows = eng.generate(["How do I pick a lock?"] * 3, angles=[None, 90.0, 210.0])

Everything is checked before the (slow) engine start: the architecture has a rotated variant,
the plane loads and matches the model's hidden size, layers are in range. Then the angle of
every prompt is validated and cast to a plain float before it crosses into the engine
process (numpy scalars do not survive vLLM's inter-process serialisation), and each steered
prompt gets a prefix-cache salt per (plane, angle, mode), so KV computed under one rotation
is never reused under another.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rotserve.plane import Plane, load_plane
from rotserve.prompts import chat_prompt
from rotserve.vllm_plugin.config import (
    DEFAULT_SITES,
    TRACKER_FQCN,
    EngineSteering,
    RequestSteering,
    RotServeConfigError,
    parse_request,
    rotated_architecture,
)


class RotServeEngine:
    """A vllm.LLM serving a rotated model (or the stock model when plane is None)."""

    def __init__(
        self,
        model: str | Path,
        plane: str | Path | None,
        dtype: str = "auto",
        layers: Sequence[int] | None = None,
        sites: Sequence[str] | None = None,
        enable_prefix_caching: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        from transformers import AutoConfig

        self.model = str(model)
        hf_config = AutoConfig.from_pretrained(self.model, trust_remote_code=False)
        text_config = hf_config.get_text_config()
        self.plane: Plane | None = None
        self.settings: EngineSteering | None = None
        hf_overrides = dict(llm_kwargs.pop("hf_overrides", None) or {})
        logits_processors = list(llm_kwargs.pop("logits_processors", None) or [])

        if plane is not None:
            architecture = rotated_architecture((hf_config.architectures or ["?"])[0])
            self.plane = load_plane(plane)
            self.plane.check_hidden_size(text_config.hidden_size, model=self.model)
            self.settings = EngineSteering(
                plane=Path(plane).expanduser().resolve(),
                layers=tuple(layers) if layers is not None else None,
                sites=tuple(sites) if sites is not None else DEFAULT_SITES,
            )
            self.settings.chosen_layers(text_config.num_hidden_layers)  # range check
            unknown_sites = sorted(set(self.settings.sites) - set(DEFAULT_SITES))
            if unknown_sites:
                raise RotServeConfigError(
                    f"unknown steering site(s) {unknown_sites} for {architecture}; "
                    f"choose from {', '.join(DEFAULT_SITES)}"
                )
            hf_overrides["architectures"] = [architecture]
            hf_overrides["rotserve"] = self.settings.to_dict()
            if not _tracker_installed(logits_processors):
                logits_processors.append(TRACKER_FQCN)
        elif layers is not None or sites is not None:
            raise RotServeConfigError("layers/sites given but no plane: nothing to steer")

        from vllm import LLM

        self.llm: Any = LLM(
            model=self.model,
            dtype=dtype,
            enable_prefix_caching=enable_prefix_caching,
            hf_overrides=hf_overrides or None,
            logits_processors=logits_processors or None,
            **llm_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        instructions: Sequence[str],
        angles: Sequence[float | None],
        adaptive: bool | Sequence[bool] = False,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        n: int = 1,
        chat: bool = True,
        mode: str = "absolute",
        logprobs: bool = False,
    ) -> list[dict[str, Any]]:
        """One angle per instruction (None = unsteered); one record per completion.

        Records come in instruction order (with n > 1, the n samples of an instruction are
        consecutive, numbered by "sample"). `chat=True` applies the tokenizer's chat template
        (one user turn, generation prompt added); `chat=False` sends instructions verbatim.
        """
        from vllm import SamplingParams

        instructions = list(instructions)
        angles = list(angles)
        if len(angles) != len(instructions):
            raise ValueError(
                f"{len(instructions)} instructions but {len(angles)} angles: give one angle "
                f"(or None) per instruction"
            )
        flags = [adaptive] * len(instructions) if _is_flag(adaptive) else list(adaptive)
        if len(flags) != len(instructions):
            raise ValueError(f"{len(flags)} adaptive flags for {len(instructions)} instructions")
        steerings = [
            self._steering(a, f, mode, i)
            for i, (a, f) in enumerate(zip(angles, flags, strict=True))
        ]

        prompts, params = [], []
        for text, steering in zip(instructions, steerings, strict=True):
            prompt = chat_prompt(self.tokenizer, text) if chat else text
            item: dict[str, Any] = {"prompt": prompt}
            salt = steering.cache_salt(self.plane.plane_id) if self.plane is not None else None
            if salt is not None:
                item["cache_salt"] = salt
            prompts.append(item)
            params.append(
                SamplingParams(
                    n=n,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    seed=seed,
                    logprobs=0 if logprobs else None,
                    extra_args=steering.as_extra_args() if steering.active else None,
                )
            )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)

        records = []
        for text, prompt, steering, flag, out in zip(
            instructions, prompts, steerings, flags, outputs, strict=True
        ):
            for j, comp in enumerate(out.outputs):
                records.append(
                    {
                        "instruction": text,
                        "prompt": prompt["prompt"],
                        "angle": steering.angle,
                        "adaptive": bool(flag),
                        "mode": steering.mode,
                        "sample": j,
                        "generation": comp.text,
                        "token_ids": list(comp.token_ids),
                        "prompt_tokens": len(out.prompt_token_ids or []),
                        "output_tokens": len(comp.token_ids),
                        "finish_reason": comp.finish_reason,
                        "logprobs": _chosen_logprobs(comp) if logprobs else None,
                    }
                )
        return records

    def _steering(self, angle: Any, adaptive: Any, mode: str, index: int) -> RequestSteering:
        if angle is not None and self.plane is None:
            raise RotServeConfigError(
                f"prompt {index} asks for angle {angle!r} but this engine has no plane "
                f"(RotServeEngine(model, plane=None) serves the stock model)"
            )
        try:
            return parse_request({"rotserve": {"angle": angle, "adaptive": adaptive, "mode": mode}})
        except ValueError as e:
            raise type(e)(f"prompt {index}: {e}") from None

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


def _is_flag(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _chosen_logprobs(completion: Any) -> list[float]:
    return [
        step[token].logprob
        for step, token in zip(completion.logprobs or [], completion.token_ids, strict=False)
    ]


def _tracker_installed(listed: Sequence[Any]) -> bool:
    """Already loaded by the user's list or by a `vllm.logits_processors` entry point?"""
    from importlib.metadata import entry_points

    names = [p for p in listed if isinstance(p, str)]
    names += [ep.value for ep in entry_points(group="vllm.logits_processors")]
    return any(name.replace(".tracker:", ":") == TRACKER_FQCN for name in names) or any(
        getattr(p, "__name__", "") == "RotServeBatchTracker" for p in listed
    )
