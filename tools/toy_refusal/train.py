"""Train the toy refusal model: a small Qwen2 that refuses harmful-type requests.

Why: the method needs a chat model whose refusal is carried by a residual-stream direction, and
the project must demonstrate and test it without downloads or a GPU. A 4-layer, 128-wide Qwen2
trained on the synthetic chats of tools/toy_refusal/synthetic.py learns this in a few minutes on 2 cores.

Loss is on the assistant tokens only (reply + <|im_end|>), so the model learns to answer, not to
write prompts. Training is seeded and single-process deterministic for a fixed thread count.

LayerDrop (each step skips each decoder layer with probability `layer_drop`) is what makes the
toy steer like a large chat model. Trained without it, the toy decides to refuse in layer 0's
MLP, from a direction (L0.resid_mid) about 70 degrees from the one every later site carries;
the max_sim plane then puts its refusal peak near 300 degrees instead of 0, and 0 degrees in
the plain mask made only 28-43% of harmless prompts refuse. With layers dropped at random, every
layer must be able to read the refusal feature and act on it, as in deep models, where no single
layer decides: the max_sim plane's refusal peak moves to 0 degrees (97% of held-out harmless
prompts refuse there, with the plain mask), while unsteered refusal stays >= 95% / <= 5%.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2ForCausalLM

from rotserve.paths import default_prompts
from rotserve.scoring import is_refusal
from rotserve.tiny_model import EOS_ID, PAD_ID, make_config, save_model_dir
from tools.toy_refusal.synthetic import HARMFUL, HARMLESS, Example, train_heldout_split
from tools.toy_refusal.tokenizer import prompt_texts, toy_tokenizer

IGNORE = -100


@dataclass
class TrainConfig:
    """Everything that determines the trained weights (plus threads, which affect float sums)."""

    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 1024
    n_train: int = 8000  # harmful training chats; each is seen about once
    harmless_ratio: float = 1.25  # harmless chats per harmful one in training
    novel: float = 0.05  # share of harmless training chats about made-up words
    n_heldout: int = 200  # per label
    steps: int = 800
    helpful_steps: int = 0  # first steps on harmless chats only: a helpful "base" model first
    head_tokens: int = 4  # the first reply tokens decide refuse vs answer...
    head_weight: float = 5.0  # ...so their loss counts this much more
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.01
    layer_drop: float = 0.4  # chance that a training step skips each decoder layer (LayerDrop)
    threads: int = 1  # measured: 1 thread is faster than 2 for this size, and reproducible
    eval_max_new_tokens: int = 32


def chat_prompt_ids(tokenizer: PreTrainedTokenizerFast, instruction: str) -> list[int]:
    """Token ids of one user turn plus the assistant generation prompt (no system prompt)."""
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=True
    )
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc  # transformers 5 returns a dict
    return list(ids)


def encode_example(tokenizer: PreTrainedTokenizerFast, ex: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are IGNORE on the prompt, the reply + <|im_end|> elsewhere.

    Prompt and reply are tokenized separately, exactly as generation sees them.
    """
    prompt = chat_prompt_ids(tokenizer, ex.instruction)
    reply = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [EOS_ID]
    return prompt + reply, [IGNORE] * len(prompt) + reply


def _batch(rows: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad a training batch (causal attention never looks right, so pads are inert)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def weighted_reply_loss(
    logits: torch.Tensor, labels: torch.Tensor, head_tokens: int, head_weight: float
) -> torch.Tensor:
    """Next-token cross-entropy on reply tokens, the first `head_tokens` weighted `head_weight`.

    Why: whether to refuse is decided in the first reply tokens, which are ~3% of the reply
    tokens; without the weight the loss is dominated by the wording of the answers.
    """
    logits, targets = logits[:, :-1], labels[:, 1:]
    valid = targets != IGNORE
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.clamp(min=0).reshape(-1),
        reduction="none",
    ).view_as(targets)
    position = valid.long().cumsum(dim=1)  # 1 for the first reply token, 2 for the next...
    weight = torch.where(position <= head_tokens, head_weight, 1.0) * valid
    return (ce * weight).sum() / weight.sum()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    instructions: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> list[str]:
    """Greedy replies, batched with LEFT padding so position -1 is the last prompt token."""
    model.eval()
    replies: list[str] = []
    for start in range(0, len(instructions), batch_size):
        prompts = [chat_prompt_ids(tokenizer, t) for t in instructions[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[EOS_ID, PAD_ID],
            pad_token_id=PAD_ID,
        )
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return replies


def refusal_rate(replies: Sequence[str]) -> float:
    """Share of replies the substring scorer counts as refusals (one of its markers inside)."""
    return sum(is_refusal(r)[0] for r in replies) / max(1, len(replies))


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_new_tokens: int = 32,
) -> dict[str, float]:
    """Refusal rates on harmful-type and harmless instructions (greedy, unsteered)."""
    return {
        "harmful_refusal": refusal_rate(
            generate_replies(model, tokenizer, harmful, max_new_tokens)
        ),
        "harmless_refusal": refusal_rate(
            generate_replies(model, tokenizer, harmless, max_new_tokens)
        ),
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
    }


def _shipped_prompts() -> tuple[list[str], list[str]]:
    out = []
    for path in default_prompts().values():  # harmful, then harmless
        lines = path.read_text().splitlines()
        out.append([json.loads(line)["instruction"] for line in lines if line.strip()])
    return out[0], out[1]


def train_toy(out_dir: str | Path, cfg: TrainConfig | None = None, log_every: int = 50) -> dict:
    """Train, evaluate on held-out data, save to out_dir; return the report (also saved).

    Held-out sets: the synthetic held-out split (unseen verb-object pairs and topics) and the
    hand-written data/prompts sets, which are excluded from training verbatim.
    """
    cfg = cfg or TrainConfig()
    if not 0.0 <= cfg.layer_drop < 1.0:
        raise ValueError(
            f"layer_drop must be in [0, 1) (the chance a step skips each layer), got "
            f"{cfg.layer_drop}; use 0 to train without LayerDrop"
        )
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(cfg.seed)

    tokenizer = toy_tokenizer(cfg.vocab_size)
    shipped_harmful, shipped_harmless = _shipped_prompts()
    train, heldout = train_heldout_split(
        cfg.n_train,
        cfg.n_heldout,
        cfg.seed,
        exclude=prompt_texts(),
        harmless_ratio=cfg.harmless_ratio,
        novel=cfg.novel,
    )
    rows = [encode_example(tokenizer, ex) for ex in train]
    helpful_rows = [i for i, ex in enumerate(train) if ex.label == HARMLESS]

    config = make_config(
        "qwen2",
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    config._attn_implementation = "eager"  # measured 1.5x faster than sdpa at this size on CPU
    model = Qwen2ForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    all_layers = model.model.layers
    drop_rng = random.Random(f"layer-drop-{cfg.seed}")
    order: list[int] = []
    losses: list[float] = []
    for step in range(cfg.steps):
        if step == cfg.helpful_steps:
            order = []  # from here on: all chats
        if len(order) < cfg.batch_size:
            epoch = list(range(len(rows))) if step >= cfg.helpful_steps else list(helpful_rows)
            rng.shuffle(epoch)
            order += epoch
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = _batch([rows[i] for i in idx])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        if cfg.layer_drop:
            kept = [layer for layer in all_layers if drop_rng.random() >= cfg.layer_drop]
            model.model.layers = torch.nn.ModuleList(kept or [all_layers[-1]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = weighted_reply_loss(logits, batch["labels"], cfg.head_tokens, cfg.head_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        model.model.layers = all_layers
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(
                f"step {step + 1}/{cfg.steps} loss {recent:.4f} ({time.time() - t_start:.0f} s)",
                flush=True,
            )
    train_s = time.time() - t_start

    model.eval()
    by_label = {
        lab: [ex.instruction for ex in heldout if ex.label == lab] for lab in (HARMFUL, HARMLESS)
    }
    report = {
        "config": asdict(cfg),
        "train_seconds": round(train_s, 1),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "synthetic_heldout": evaluate(
            model, tokenizer, by_label[HARMFUL], by_label[HARMLESS], cfg.eval_max_new_tokens
        ),
        "data_prompts": evaluate(
            model, tokenizer, shipped_harmful, shipped_harmless, cfg.eval_max_new_tokens
        ),
    }
    save_model_dir(model, tokenizer, out_dir)
    (Path(out_dir) / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (Path(out_dir) / "README.md").write_text(model_card(report))
    return report


def model_card(report: dict) -> str:
    """A short README for the saved model: what it is, how it was made, what it scores."""
    cfg, syn, shipped = report["config"], report["synthetic_heldout"], report["data_prompts"]
    return f"""# toy-refusal

A {cfg["num_layers"]}-layer, {cfg["hidden_size"]}-wide Qwen2 ({cfg["num_heads"]} heads of size \
{cfg["hidden_size"] // cfg["num_heads"]}, {cfg["num_kv_heads"]} KV heads, MLP \
{cfg["intermediate_size"]}, byte-level BPE of {cfg["vocab_size"]} tokens), float32, trained from
scratch by `python jobs/train_toy.py` (seed {cfg["seed"]}, {cfg["steps"]} steps, LayerDrop \
{cfg["layer_drop"]}, {report["train_seconds"]} s wall-clock, on one thread) on the synthetic chats of `tools/toy_refusal/synthetic.py`: harmful-type
requests answered with refusals, harmless ones answered helpfully. It exists to demonstrate and
test angular steering without downloads; it knows nothing beyond those chats.

Chat format: `<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`, no system prompt;
generation ends at `<|im_end|>` (id 2); `<|endoftext|>` (id 0) pads.

Refusal rate, greedy, {cfg["eval_max_new_tokens"]} new tokens, substring scorer:

| held-out set | harmful-type | harmless |
|---|---|---|
| synthetic held-out split (unseen verb-object pairs) | {syn["harmful_refusal"]:.3f} \
(n={syn["n_harmful"]}) | {syn["harmless_refusal"]:.3f} (n={syn["n_harmless"]}) |
| data/prompts (hand-written, never trained on; word lists cover their vocabulary) | {shipped["harmful_refusal"]:.3f} \
(n={shipped["n_harmful"]}) | {shipped["harmless_refusal"]:.3f} (n={shipped["n_harmless"]}) |
"""
