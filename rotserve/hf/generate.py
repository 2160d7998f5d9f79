"""The reference generator: rotation through forward hooks on a transformers model.

This is rotserve's oracle, not its engine: the vLLM plugin must produce the same tokens, and
the benchmarks measure how far ahead of it the plugin is. It is written to be obviously
correct: the same `rotate` as the plugin, applied to the output of every steered norm module,
with one row of the angle table per sequence in the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rotserve.hf.sites import decoder_layers
from rotserve.plane import Plane, load_plane
from rotserve.rotation import TABLE_WIDTH, angle_table, rotate_planes
from rotserve.steering import (
    SITES,
    PlaneCatalog,
    RequestSteering,
    check_plane_name,
    parse_request,
    steering_row,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_hf_model(
    model: str | Path,
    dtype: str | torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a local path or HF id, eval mode, left padding. dtype "auto":
    the checkpoint's own (what `rotserve.dtype.choose_dtype` means by auto on a GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(
        str(model),
        dtype="auto" if dtype == "auto" else resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )
    return lm.to(device).eval(), tok


@dataclass(frozen=True)
class HFGeneration:
    """One HF generation; token_ids and logprobs are tuples, like rotserve.engine.Completion's,
    so the parity tests compare the two records field by field."""

    prompt: str
    angle: float | None
    adaptive: bool
    token_ids: tuple[int, ...]  # new tokens only, up to and including EOS if it was produced
    text: str
    logprobs: tuple[float, ...] = ()  # of each chosen token
    finish_reason: str = "length"


class RotationHooks:
    """Forward hooks that rotate the output of the chosen norm modules of every chosen layer.

    `table` holds one row per sequence; each hook expands it to one row per token, so a batch
    mixes angles freely and rows with no angle pass through bit-identical.

    `for_planes` builds the several-planes form the vLLM plugin runs: hooks at every layer x
    site, rows carrying the plane one-hot and one gate per hooked norm (rotserve.steering's
    row builder, steering_row), and the same op (rotate_planes), so each row steers its own
    plane in its own window.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plane: Plane,
        layers: Sequence[int] | None = None,
        sites: Sequence[str] = SITES,
    ) -> None:
        all_layers = decoder_layers(model)
        hidden = all_layers[0].attn_norm.weight.numel()
        plane.check_hidden_size(hidden, model=getattr(model.config, "_name_or_path", "the model"))
        chosen = set(range(len(all_layers)) if layers is None else layers)
        param = next(model.parameters())
        self.basis = plane.basis.to(param.device)
        self.bases = self.basis[None]
        self.table: torch.Tensor | None = None  # [batch, width] while active
        self.modules = [ls.norm(s) for ls in all_layers if ls.index in chosen for s in sites]
        self.gates: list[int | None] = [None] * len(self.modules)
        self.catalog: PlaneCatalog | None = None
        self._handles: list[Any] = []

    @classmethod
    def for_planes(cls, model: torch.nn.Module, planes: Mapping[str, Plane]) -> RotationHooks:
        """Hooks for several named planes (the first is the default), every layer steerable."""
        named = list(planes.items())
        hooks = cls(model, named[0][1])
        all_layers = decoder_layers(model)
        for name, plane in named:
            check_plane_name(name)
            plane.check_hidden_size(hooks.basis.shape[-1])
        steerable = tuple((ls.index, s) for ls in all_layers for s in SITES)
        hooks.catalog = PlaneCatalog(
            names=tuple(n for n, _ in named),
            ids=tuple(p.plane_id for _, p in named),
            num_layers=len(all_layers),
            steerable=steerable,
            default_layers=tuple(range(len(all_layers))),
            default_sites=SITES,
            slots=len(named),
        )
        hooks.bases = torch.stack([p.basis for _, p in named]).to(hooks.basis.device)
        hooks.modules = [all_layers[layer].norm(site) for layer, site in steerable]
        hooks.gates = list(range(len(steerable)))
        return hooks

    def rows(self, steerings: Sequence[RequestSteering]) -> torch.Tensor:
        """One table row per sequence (RequestSteeringError for an unknown plane or layer)."""
        return torch.stack([steering_row(st, self.catalog) for st in steerings])

    def _hook(
        self, gate: int | None, module: torch.nn.Module, args: Any, output: torch.Tensor
    ) -> torch.Tensor:
        if self.table is None:
            return output
        batch, seq, hidden = output.shape
        per_token = self.table.repeat_interleave(seq, dim=0)
        k = self.bases.shape[0]
        onehot = per_token[:, TABLE_WIDTH : TABLE_WIDTH + k]
        g = None if gate is None else per_token[:, TABLE_WIDTH + k + gate]
        flat = output.reshape(-1, hidden)
        return rotate_planes(flat, self.bases, per_token, onehot, g).view(batch, seq, hidden)

    @contextmanager
    def steering(self, table: torch.Tensor) -> Iterator[None]:
        self.table = table.to(self.basis.device)
        self._handles = [
            m.register_forward_hook(partial(self._hook, gate))
            for m, gate in zip(self.modules, self.gates, strict=True)
        ]
        try:
            yield
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []
            self.table = None


class HFRotatedGenerator:
    """Batched generation with a different angle (or none) per row, via hooks."""

    def __init__(
        self,
        model: str | Path,
        plane: Plane | str | Path | None,
        dtype: str | torch.dtype = torch.float32,
        device: str = "cpu",
        layers: Sequence[int] | None = None,
        sites: Sequence[str] = SITES,
        trust_remote_code: bool = False,
        planes: Mapping[str, Plane | str | Path] | None = None,
    ) -> None:
        """One `plane` (steered at `layers` x `sites`), or several named `planes`, each
        generate() row then naming its plane and window (generate's plane=, layers=)."""
        self.model, self.tokenizer = load_hf_model(model, dtype, device, trust_remote_code)
        if plane is not None and not isinstance(plane, Plane):
            plane = load_plane(plane)
        self.plane = plane
        self.hooks = RotationHooks(self.model, plane, layers, sites) if plane is not None else None
        if planes is not None:
            loaded = {n: p if isinstance(p, Plane) else load_plane(p) for n, p in planes.items()}
            self.plane = next(iter(loaded.values()))
            self.hooks = RotationHooks.for_planes(self.model, loaded)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        angles: Sequence[float | None],
        adaptive: bool | Sequence[bool] = False,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int | None = None,
        batch_size: int = 16,
        relative: bool | Sequence[bool] = False,
        plane: Sequence[str | None] | None = None,
        layers: Sequence[Any] | None = None,
    ) -> list[HFGeneration]:
        """prompts are already chat-templated strings; one angle per prompt, None = unsteered;
        `relative` per prompt (or shared): "rotate by" the angle instead of "rotate to".
        With several planes, `plane` and `layers` (a window each, None = the default) per
        prompt."""
        if len(angles) != len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts but {len(angles)} angles: give one per prompt"
            )
        flags = [adaptive] * len(prompts) if isinstance(adaptive, bool) else list(adaptive)
        turns = [relative] * len(prompts) if isinstance(relative, bool) else list(relative)
        names = list(plane) if plane is not None else [None] * len(prompts)
        windows = list(layers) if layers is not None else [None] * len(prompts)
        if (plane is not None or layers is not None) and (
            self.hooks is None or self.hooks.catalog is None
        ):
            raise ValueError("plane/layers per prompt need a generator built with planes={...}")
        if self.hooks is None and any(a is not None for a in angles):
            raise ValueError("angles given but the generator has no plane")
        out: list[HFGeneration] = []
        for start in range(0, len(prompts), batch_size):
            sl = slice(start, start + batch_size)
            out += self._generate_batch(
                list(prompts[sl]),
                list(angles[sl]),
                flags[sl],
                max_new_tokens,
                temperature,
                seed,
                turns[sl],
                names[sl],
                windows[sl],
            )
        return out

    @torch.no_grad()
    def continuation_logprobs(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        continuation_token_ids: Sequence[Sequence[int]],
        angles: Sequence[float | None],
        adaptive: bool | Sequence[bool] = False,
    ) -> list[tuple[float, ...]]:
        """Teacher-forced log-prob of each continuation token under its steering (the truth
        that a half-precision engine's log-probs are compared with). One sequence per forward,
        so no padding enters the comparison."""
        flags = [adaptive] * len(angles) if isinstance(adaptive, bool) else list(adaptive)
        if self.hooks is None and any(a is not None for a in angles):
            raise ValueError("angles given but the generator has no plane")
        device = next(self.model.parameters()).device
        out = []
        for prompt, cont, angle, flag in zip(
            prompt_token_ids, continuation_token_ids, angles, flags, strict=True
        ):
            ids = torch.tensor([[*prompt, *cont]], device=device)
            if self.hooks is not None:
                with self.hooks.steering(self._table([angle], [flag])):
                    logits = self.model(ids).logits
            else:
                logits = self.model(ids).logits
            logps = logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            chosen = logps.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
            out.append(tuple(chosen.tolist()))
        return out

    def _table(
        self,
        angles: Sequence[float | None],
        adaptive: Sequence[bool],
        relative: Sequence[bool] | None = None,
        planes: Sequence[str | None] | None = None,
        windows: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """One row per sequence: the angle table, or with several planes the plugin's rows."""
        if self.hooks is None or self.hooks.catalog is None:
            return angle_table(
                list(angles),
                adaptive=list(adaptive),
                relative=list(relative or [False] * len(angles)),
            )
        n = len(angles)
        steerings = []
        for a, ad, rel, p, w in zip(
            angles, adaptive, relative or [False] * n, planes or [None] * n,
            windows or [None] * n, strict=True,
        ):  # fmt: skip
            fields: dict[str, Any] = {"angle": a, "adaptive": ad}
            fields["mode"] = "relative" if rel else "absolute"
            if p is not None:
                fields["plane"] = p
            if w is not None:
                fields["layers"] = w
            steerings.append(parse_request({"rotserve": fields}))
        return self.hooks.rows(steerings)

    def _generate_batch(
        self,
        prompts: list[str],
        angles: list[float | None],
        adaptive: list[bool],
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
        relative: list[bool] | None = None,
        planes: list[str | None] | None = None,
        windows: list[Any] | None = None,
    ) -> list[HFGeneration]:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        table = self._table(angles, adaptive, relative, planes, windows)
        if self.hooks is not None:
            with self.hooks.steering(table):
                res = self.model.generate(**enc, **kwargs)
        else:
            res = self.model.generate(**enc, **kwargs)
        new = res.sequences[:, enc["input_ids"].shape[1] :]
        logps = torch.stack(res.logits, 1).float().log_softmax(-1)  # [B, T, V]
        chosen = logps.gather(-1, new[:, : logps.shape[1], None]).squeeze(-1)
        gens = []
        for i, prompt in enumerate(prompts):
            ids = new[i].tolist()
            finish = "length"
            for j, t in enumerate(ids):
                if t in eos_ids:
                    ids, finish = ids[: j + 1], "stop"
                    break
            gens.append(
                HFGeneration(
                    prompt=prompt,
                    angle=angles[i],
                    adaptive=adaptive[i],
                    token_ids=tuple(ids),
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    logprobs=tuple(chosen[i, : len(ids)].tolist()),
                    finish_reason=finish,
                )
            )
        return gens
