"""Reading the residual stream of an HF model: hooks, batching, padding checks. No statistics.

`ActivationReader.batches(instructions)` yields, per batch of prompts, one float32 tensor
[batch, sites, hidden] holding, for every site, the activation at the chosen positions:

- sites: resid_mid (input of the pre-MLP norm, read by a forward pre-hook on that norm) and
  resid_post (the decoder layer's output, read by a forward hook) of every layer, in stream
  order L0.resid_mid, L0.resid_post, L1.resid_mid, ...
- positions: "last" = the last template token (position -1 under left padding);
  "post-instruction" = the mean over the template tokens after the instruction
  (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`).

The hooks reduce each site's [batch, seq, hidden] output to [batch, hidden] on the spot, so
a batch costs O(batch x sites x hidden) beyond the forward pass itself. Only the base model
runs (no LM head): logits over the vocabulary are never needed, nor is generation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from rotserve.extract.candidates import Site, all_sites
from rotserve.hf.sites import decoder_layers
from rotserve.prompts import chat_prompt

POSITIONS = ("last", "post-instruction")


class PaddingError(RuntimeError):
    """The batch does not end where each prompt ends: activations would be read at pads."""


@dataclass(frozen=True)
class EncodedBatch:
    input_ids: torch.Tensor  # [B, T], left padded
    attention_mask: torch.Tensor  # [B, T]
    weights: torch.Tensor  # [B, T] float32: how each position enters the per-prompt average


class ActivationReader:
    """Runs prompts through a loaded HF model and returns per-site activations, batched."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        positions: str = "last",
        batch_size: int = 16,
        chat_template: str | None = None,
        progress: bool = True,
    ) -> None:
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose from {', '.join(POSITIONS)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.layers = decoder_layers(model)  # raises UnsupportedArchitectureError, listing them
        self.sites: list[Site] = all_sites(len(self.layers))
        self.hidden = int(model.config.hidden_size)
        self.positions = positions
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.progress = progress
        # Left padding puts every prompt's last token at position -1; right padding would read
        # pads there and change which layer wins.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if positions == "post-instruction" and not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "--positions post-instruction needs a fast tokenizer (character offsets); "
                "use --positions last"
            )

    def chat_texts(self, instructions: Sequence[str]) -> list[str]:
        return [chat_prompt(self.tokenizer, t, self.chat_template) for t in instructions]

    def encode(self, instructions: Sequence[str]) -> EncodedBatch:
        """Template, tokenise (left padded) and check that position -1 ends every prompt."""
        texts = self.chat_texts(instructions)
        tok = self.tokenizer
        want_offsets = self.positions == "post-instruction"
        enc = tok(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,  # the chat template already wrote any BOS
            return_offsets_mapping=want_offsets,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        alone = tok(texts, add_special_tokens=False)["input_ids"]
        for b, row in enumerate(alone):
            if (
                int(mask[b].sum()) != len(row)
                or int(mask[b, -1]) != 1
                or int(ids[b, -1]) != row[-1]
            ):
                raise PaddingError(
                    f"prompt {b} of the batch does not end at position -1 (its last token is "
                    f"{row[-1]}, position -1 holds {int(ids[b, -1])}): the tokenizer pads on the "
                    f"{tok.padding_side}; rotserve needs left padding"
                )
        weights = torch.zeros(ids.shape, dtype=torch.float32)
        if want_offsets:
            for b, (text, instr) in enumerate(zip(texts, instructions, strict=True)):
                k = _post_instruction_count(text, instr, enc["offset_mapping"][b], mask[b])
                weights[b, -k:] = 1.0 / k
        else:
            weights[:, -1] = 1.0
        return EncodedBatch(ids, mask, weights)

    @torch.no_grad()
    def read(self, batch: EncodedBatch) -> torch.Tensor:
        """One forward pass of the base model; [B, sites, hidden] float32."""
        device = next(self.model.parameters()).device
        weights = batch.weights.to(device)
        captured: list[torch.Tensor | None] = [None] * len(self.sites)

        def reduce(h: torch.Tensor) -> torch.Tensor:
            # float32 before the weighted sum: bf16 activations averaged in bf16 lose digits.
            return torch.einsum("bt,bth->bh", weights, h.float())

        def mid_hook(index: int) -> Any:
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                h = args[0] if args else kwargs["hidden_states"]
                captured[index] = reduce(h)

            return hook

        def post_hook(index: int) -> Any:
            def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
                h = output[0] if isinstance(output, tuple) else output
                captured[index] = reduce(h)

            return hook

        handles = []
        try:
            for ls in self.layers:
                mid = 2 * ls.index
                handles.append(
                    ls.mlp_norm.register_forward_pre_hook(mid_hook(mid), with_kwargs=True)
                )
                handles.append(ls.layer.register_forward_hook(post_hook(mid + 1)))
            ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device)
            # Positions count real tokens only, as generate() does: a left-padded prompt sees
            # the same positions as the same prompt alone.
            position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
            self.model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
            )
        finally:
            for h in handles:
                h.remove()
        missing = [self.sites[i].name for i, c in enumerate(captured) if c is None]
        if missing:
            raise RuntimeError(
                f"hooks at {', '.join(missing)} never fired: unexpected model layout"
            )
        return torch.stack(captured, dim=1).cpu()  # type: ignore[arg-type]

    def batches(self, instructions: Sequence[str], desc: str = "") -> Iterator[torch.Tensor]:
        """Activations for all instructions, one batch at a time.

        Prompts are sorted by length first (less padding, same sums); the caller gets batches,
        not per-prompt order, which no statistic here needs.
        """
        order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
        starts = range(0, len(order), self.batch_size)
        for s in tqdm(starts, desc=desc, unit="batch", disable=not self.progress, leave=False):
            chunk = [instructions[i] for i in order[s : s + self.batch_size]]
            yield self.read(self.encode(chunk))


def _post_instruction_count(
    text: str, instruction: str, offsets: torch.Tensor, mask: torch.Tensor
) -> int:
    """How many tokens at the end of `text` start after the instruction does."""
    pos = text.rfind(instruction)
    if pos < 0:
        raise ValueError("the chat template changed the instruction text; use --positions last")
    end = pos + len(instruction)
    starts = offsets[:, 0]
    k = int(((starts >= end) & (mask > 0)).sum())
    if k < 1:
        raise ValueError(
            "the chat template adds no tokens after the instruction; use --positions last"
        )
    return k
