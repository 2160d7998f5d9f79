"""Judging a grid: rotserve's judge against a plain one-token generate on the same engine."""

from __future__ import annotations

from benchmarks.sections.common import (
    MAX_EXTERNAL_CORES,
    Context,
    bench_instructions,
    round_logger,
    summarise,
)
from benchmarks.timing import alternate


def run(ctx: Context) -> None:
    """rotserve's judge vs plain vLLM on ONE engine (the shipped toy judge, prefix caching off).

    Contender `rotserve`: one shard of N rows through rotserve.judge.engine.judge_shard, the
    path a judge actor runs (constrained to the behaviour labels, top log-probs and label
    probabilities, verdict rows as an Arrow table). Contender `plain`: llm.generate of the same prompt token ids, greedy, max_tokens 1.
    Both count rows; the prompts are built once, outside the timing (the driver does that
    before any engine starts).
    """
    from vllm import SamplingParams

    from rotserve.fanout import EngineSpec
    from rotserve.judge.engine import JudgeEngine, VerdictContext, judge_shard
    from rotserve.judge.plan import JudgeItem, make_judge_plan
    from rotserve.judge.prompts import judge_input
    from rotserve.judge.rubrics import BEHAVIOUR
    from rotserve.paths import toy_judge_dir

    s = ctx.settings
    n = s.judge_rows
    ctx.log(f"judge: {n} rows, rotserve judge vs plain generate (1 token) on one engine")
    kwargs = {"max_model_len": 512, "enable_prefix_caching": False, "seed": 0}
    if s.enforce_eager:
        kwargs["enforce_eager"] = True
    engine = JudgeEngine(EngineSpec(model=str(toy_judge_dir()), dtype=s.dtype, llm_kwargs=kwargs))
    try:
        tok = engine.llm.get_tokenizer()
        replies = ("I'm sorry, but I cannot help with that.", "Sure! Here are three tips. 1. Plan.")
        items = [
            JudgeItem.of(
                f"{i:06d}", judge_input(BEHAVIOUR, tok, instr, replies[i % 2], 512).token_ids
            )
            for i, instr in enumerate(bench_instructions(n))
        ]
        shard = make_judge_plan(items, n).shards[0]
        vctx = VerdictContext("bench", "toy-judge", BEHAVIOUR)
        plain = SamplingParams(temperature=0.0, max_tokens=1)
        prompts = [{"prompt_token_ids": list(it.token_ids)} for it in shard.items]

        def run_plain() -> float:
            return float(len(engine.llm.generate(prompts, plain, use_tqdm=False)))

        rounds = alternate(
            {
                "rotserve": lambda: float(judge_shard(engine, shard, vctx).num_rows),
                "plain": run_plain,
            },
            s.judge_rounds,
            s.warmup,
            round_logger(ctx, "judge"),
            settle_s=s.settle_s,
            max_external=MAX_EXTERNAL_CORES,
            max_retries=s.judge_rounds,
        )
        labels = judge_shard(engine, shard, vctx).column("label").to_pylist()
        label_tokens = {lb: len(tok(lb, add_special_tokens=False)["input_ids"]) for lb in labels}
    finally:
        engine.close()
    lengths = [it.n_tokens for it in items]
    ctx.details["judge"] = {
        "rows": n,
        "rounds": s.judge_rounds,
        "judge": "data/toy-judge",
        "rubric": BEHAVIOUR.name,
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths),
        "labels": {lb: labels.count(lb) for lb in sorted(set(labels))},
        # A guided choice decodes every token of its label, then the EOS: the plain contender
        # decodes one token. On a tiny judge those decode steps, not the prefill, set the time.
        "label_tokens": label_tokens,
        **summarise(rounds, "rotserve", "plain"),
    }
