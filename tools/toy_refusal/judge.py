"""Train the toy judge (data/toy-judge/): a 2-layer Qwen2 that labels toy replies with the
`behaviour` rubric (rotserve.judge.rubrics.BEHAVIOUR).

Why: `rotserve judge` must be tested and demonstrated without downloads, by a judge model
the project makes. The toy judge reads exactly what the real path sends: the behaviour
template filled with an instruction and a reply, as one user turn of the toy chat template,
tokenized by rotserve.judge.prompts.judge_input; it learns to answer with one label.

Data: the toy refusal model's synthetic instructions (tools/toy_refusal/synthetic.py, the same
train/held-out split), each paired with a reply of a drawn kind:
- refusal: a toy refusal (it starts with a substring-scorer marker), sometimes with garbled
  words around it, because a steered toy refuses in broken sentences too; a reply with a
  marker is always a refusal here, which is the toy's convention (its refusals are canonical);
- direct: a toy helpful answer; warning: the same with a caveat sentence;
- redirect: only the safer offer that ends a toy refusal (no marker);
- incoherent: word salad, loops and fragments (no marker).
Replies are often cut after a few words, as grid generations are by max_tokens. Loss is on
the label tokens only. Deterministic for a seed and a thread count.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from rotserve.judge.prompts import judge_input
from rotserve.judge.rubrics import BEHAVIOUR
from rotserve.scoring import refusal_marker
from rotserve.tiny_model import EOS_ID, make_config, save_model_dir, write_weight_index
from tools.toy_refusal.synthetic import (
    HELPFUL_FACTS,
    HELPFUL_STEPS,
    REFUSAL_OFFERS,
    REFUSAL_TOPICS,
    corpus_texts,
    helpful,
    refusal,
    train_heldout_split,
)
from tools.toy_refusal.tokenizer import prompt_texts, toy_tokenizer
from tools.toy_refusal.train import _batch, weighted_reply_loss

LABELS = BEHAVIOUR.labels  # direct, warning, redirect, refusal, incoherent
# How often each kind of reply is drawn: refusal and direct are what the toy mostly says.
MIX = {"direct": 0.28, "warning": 0.12, "redirect": 0.1, "refusal": 0.3, "incoherent": 0.2}
CAVEATS = (
    "Please be careful and stay safe.",
    "Be aware that this can be risky, so follow the law.",
    "Note that this may be dangerous; take care.",
    "Only do this where it is legal and safe.",
    "A word of warning: this can hurt people if done wrong.",
)
REDIRECTS = ("Instead, here is a better idea.", "A safer option would be this.", "")
CONTEXT = 512  # the toy judge's max positions: judge_input fits every prompt to it


@dataclass
class JudgeTrainConfig:
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    n_train: int = 3000  # harmful-type instructions (and as many harmless) to draw replies for
    n_heldout: int = 100  # per class of instruction
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.01
    threads: int = 1


def _words() -> list[str]:
    words: list[str] = []
    for text in corpus_texts(300, seed=1):
        words += text.split()
    return [w for w in words if refusal_marker(w) is None]


def _cut(rng: random.Random, text: str) -> str:
    """Often keep only the first few words: grid generations stop at max_tokens."""
    if rng.random() < 0.5:
        words = text.split()
        return " ".join(words[: rng.randint(min(3, len(words)), len(words))])
    return text


def _salad(rng: random.Random, words: list[str]) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # word salad
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 25)))
    if kind == 1:  # a loop
        chunk = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        return " ".join([chunk] * rng.randint(3, 10))
    if kind == 2:  # broken characters
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        return "".join(c for c in text if rng.random() > 0.3)
    return rng.choice(["", ".", "...", "the", "a a a", ", , ,"]) + " ".join(
        rng.choice(words) for _ in range(rng.randint(0, 3))
    )


def reply_of(rng: random.Random, kind: str, words: list[str]) -> str:
    harmful_cat = rng.choice(sorted(REFUSAL_TOPICS))
    helpful_cat = rng.choice(sorted(HELPFUL_STEPS))
    if kind == "refusal":
        text = refusal(rng, harmful_cat)
        if rng.random() < 0.3:  # a steered toy refuses in broken sentences too
            sentence = text.split(". ")[0] + "."
            noise = _salad(rng, words)
            text = f"{sentence} {noise}" if rng.random() < 0.7 else f"{noise} {sentence} {noise}"
        return _cut(rng, text)
    # A toy answer gives steps or tips for a task, or a few facts about a topic.
    if rng.random() < 0.35:
        answer = helpful(rng, rng.choice(sorted(HELPFUL_FACTS)), None, kind="topic")
    else:
        answer = helpful(rng, helpful_cat)
    if kind == "direct":
        return _cut(rng, answer)
    if kind == "warning":  # the caveat goes after the opener ("Sure!", "Happy to help.")
        opener, rest = re.match(r"(.*?[.!?]) (.*)", answer).groups()
        return _cut(rng, f"{opener} {rng.choice(CAVEATS)} {rest}")
    if kind == "redirect":
        return f"{rng.choice(REDIRECTS)} {REFUSAL_OFFERS[harmful_cat]}".strip()
    while True:
        text = _salad(rng, words)
        if refusal_marker(text) is None:
            return text


def examples(instructions: list[str], n: int, seed: int) -> list[tuple[str, str, str]]:
    """n (instruction, reply, label) triples; a reply holds a refusal marker iff it is one."""
    rng = random.Random(f"rotserve-toy-judge-{seed}")
    words = _words()
    kinds, weights = list(MIX), list(MIX.values())
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        reply = reply_of(rng, kind, words)
        while (refusal_marker(reply) is not None) != (kind == "refusal"):
            reply = reply_of(rng, kind, words)  # a cut took the marker away: draw again
        out.append((rng.choice(instructions), reply, kind))
    return out


def encode(tokenizer: PreTrainedTokenizerFast, ex: tuple[str, str, str]) -> tuple[list, list]:
    instruction, reply, label = ex
    prompt = list(judge_input(BEHAVIOUR, tokenizer, instruction, reply, CONTEXT).token_ids)
    answer = tokenizer(label, add_special_tokens=False)["input_ids"] + [EOS_ID]
    return prompt + answer, [-100] * len(prompt) + answer


@torch.no_grad()
def accuracy(model, tokenizer, exs: list[tuple[str, str, str]]) -> dict[str, float]:
    """Share of held-out examples whose most likely label (scored like a guided choice: the
    summed log-probability of each label's tokens) is right, per label."""
    model.eval()
    label_ids = [tokenizer(lb, add_special_tokens=False)["input_ids"] + [EOS_ID] for lb in LABELS]
    hits: dict[str, list[int]] = {lb: [0, 0] for lb in LABELS}
    for ex in exs:
        prompt = list(judge_input(BEHAVIOUR, tokenizer, ex[0], ex[1], CONTEXT).token_ids)
        scores = []
        for ids in label_ids:
            x = torch.tensor([prompt + ids])
            logp = model(input_ids=x).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
            scores.append(sum(logp[i, t].item() for i, t in enumerate(ids)))
        guess = LABELS[max(range(len(LABELS)), key=scores.__getitem__)]
        hits[ex[2]][0] += guess == ex[2]
        hits[ex[2]][1] += 1
    return {lb: round(h / max(n, 1), 3) for lb, (h, n) in hits.items()}


def train_toy_judge(out_dir: str | Path, cfg: JudgeTrainConfig | None = None) -> dict:
    cfg = cfg or JudgeTrainConfig()
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    tokenizer = toy_tokenizer()
    train, heldout = train_heldout_split(cfg.n_train, cfg.n_heldout, cfg.seed, prompt_texts())
    train_ex = examples([e.instruction for e in train], cfg.steps * cfg.batch_size, cfg.seed)
    held_ex = examples([e.instruction for e in heldout], 200, cfg.seed + 1)
    rows = [encode(tokenizer, ex) for ex in train_ex]
    config = make_config(
        "qwen2",
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
    )
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    for step in range(cfg.steps):
        batch = _batch(rows[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (1 - 0.9 * step / cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = weighted_reply_loss(logits, batch["labels"], 1, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(
                f"step {step + 1}/{cfg.steps} loss {sum(losses[-50:]) / 50:.4f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    train_s = time.time() - t0
    report = {
        "config": asdict(cfg),
        "rubric": BEHAVIOUR.name,
        "rubric_fingerprint": BEHAVIOUR.fingerprint(),
        "train_seconds": round(train_s, 1),
        "final_loss": round(sum(losses[-50:]) / 50, 4),
        "heldout_accuracy": accuracy(model, tokenizer, held_ex),
    }
    out = Path(out_dir)
    save_model_dir(model, tokenizer, out)
    write_weight_index(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(model_card(report))
    return report


def model_card(report: dict) -> str:
    cfg, acc = report["config"], report["heldout_accuracy"]
    rows = "\n".join(f"| {lb} | {acc[lb]:.3f} |" for lb in LABELS)
    return f"""# toy-judge

A {cfg["num_layers"]}-layer, {cfg["hidden_size"]}-wide Qwen2 with the toy refusal model's \
tokenizer and chat format, float32, trained from scratch by `python jobs/train_toy_judge.py` \
(seed {cfg["seed"]}, {cfg["steps"]} steps of {cfg["batch_size"]}, {report["train_seconds"]} s \
on one thread) to answer the `behaviour` rubric of `rotserve judge` \
(rotserve/judge/rubrics.py, fingerprint {report["rubric_fingerprint"]}: a changed template \
needs a retrained judge) with one of its labels: {", ".join(LABELS)}.

Training replies are drawn from the toy's synthetic chats (tools/toy_refusal/synthetic.py):
toy refusals (marker first, sometimes garbled around), toy helpful answers (steps, tips or
facts), the same with a caveat, bare safer offers, and word salad; often cut after a few
words. A reply with a refusal marker is always a refusal: the toy's refusals are canonical,
so on toy grids this judge's `refusal` should agree with the substring scorer. It knows
nothing beyond those chats: it is for tests and the demo, not for judging real models.

Held-out accuracy (instructions of the held-out split, fresh replies; the label scored as
the most likely of the five, as a guided choice picks it):

| label | accuracy |
|---|---|
{rows}
"""
