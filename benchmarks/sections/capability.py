"""A capability eval at N steering settings: rotserve's one mixed pass against lm-eval looping
over the settings through `rotserve serve`, one model name at a time; and what the pass costs
beside a grid at the same settings.

Not in the test suite's tiny run: it starts a server as well as an engine (a minute on 2 cores);
its pieces are the ones tests/test_capability.py runs end to end.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.models import model_dir, plane_file
from benchmarks.sections.common import (
    MAX_EXTERNAL_CORES,
    Context,
    bench_instructions,
    even_angles,
    round_logger,
)
from benchmarks.timing import alternate

SERVER_TIMEOUT_S = 900


def run(ctx: Context) -> None:
    """Contenders, each producing lm-eval's scores of one task at every setting:

    - `rotserve`: what `rotserve capability` runs after its engine is up: lm-eval loads the task
      and builds its requests once, one engine answers every (request, setting) in mixed
      batches of the job's shard size, lm-eval scores each setting;
    - `lm_eval`: lm-eval's local-completions against `rotserve serve`, one evaluation per
      setting by model name (MODEL@θ, the bare name for the baseline), its defaults (one
      request per HTTP call);
    - `lm_eval_batched`: the same with batch_size=32 (32 prompts per HTTP call), lm-eval's
      fastest way to talk to a completions server;
    - `grid`: a grid shard of P prompts at the same settings on the same engine (the grid's
      worker, its default 32 tokens and coherence), for scale: what a capability pass adds.
    Engines on both sides: the bench dtype, prefix caching off (rounds repeat the same
    prompts), max_model_len as the other sections, started before anything is timed.
    """
    from transformers import AutoTokenizer

    from rotserve.capability.config import DEFAULT_SHARD_SIZE
    from rotserve.capability.engine import AnswerContext, answer_shard
    from rotserve.capability.job import score_answers
    from rotserve.capability.plan import make_capability_plan
    from rotserve.capability.tasks import EvalOptions, load_tasks, record_requests
    from rotserve.engine import RotServeEngine
    from rotserve.grid.plan import conditions
    from rotserve.paths import shipped_tasks_dir

    s = ctx.settings
    shape = s.grid_model
    model, plane = model_dir(shape, ctx.models_root), plane_file(shape, ctx.models_root)
    settings = conditions(even_angles(s.capability_angles), (False,), True)
    task, include = s.capability_task, [str(shipped_tasks_dir())]
    options = EvalOptions(max_length=s.max_model_len)
    ctx.log(
        f"capability: {task} at {len(settings)} settings on {shape.name}: rotserve's mixed pass "
        "vs lm-eval local-completions through rotserve serve, one model name at a time"
    )
    server = _Server(model, plane, s)
    engine = None
    try:
        t0 = time.perf_counter()
        engine = RotServeEngine(
            model,
            plane,
            dtype=s.dtype,
            enable_prefix_caching=False,
            max_model_len=s.max_model_len,
            enforce_eager=s.enforce_eager,
            seed=0,
        )
        url = server.url()
        engines_up_s = time.perf_counter() - t0
        ctx.log(f"  engine and server up after {engines_up_s:.1f} s")
        tokenizer = AutoTokenizer.from_pretrained(model)
        actx = AnswerContext(capability_id="bench")
        scores: dict[str, dict[Any, float]] = {}

        def rotserve_pass(at: list = settings) -> float:
            loaded = load_tasks([task], include)
            recorded = record_requests(loaded, tokenizer, options)
            plan = make_capability_plan(recorded.requests, at, DEFAULT_SHARD_SIZE)
            answers = [
                row
                for shard in plan.shards
                for row in answer_shard(engine, shard, actx).to_pylist()
            ]
            rows = score_answers(loaded, recorded.items, tokenizer, options, at, answers)
            scores["rotserve"] = _main_metric(rows)
            ctx.details.setdefault("capability_requests", len(recorded.requests))
            return float(len(at))

        manager = _task_manager(include)

        def lm_eval_pass(batch_size: int, key: str) -> Callable[..., float]:
            def run_pass(at: list = settings) -> float:
                from lm_eval import simple_evaluate

                got = {}
                for c in at:
                    name = str(model) if c.angle is None else f"{model}@{c.angle:g}"
                    res = simple_evaluate(
                        model="local-completions",
                        model_args={
                            "model": name,
                            "base_url": url,
                            "tokenizer_backend": "huggingface",
                            "tokenizer": str(model),
                            "max_length": s.max_model_len,
                            "batch_size": batch_size,
                        },
                        tasks=[task],
                        task_manager=manager,
                        log_samples=False,
                    )
                    metrics = res["results"][task]
                    got[c.angle] = next(
                        v for k, v in metrics.items() if k.endswith(",none") and "stderr" not in k
                    )
                scores[key] = got
                return float(len(at))

            return run_pass

        grid_pass, grid_rows = _grid_contender(engine, settings, s.capability_grid_prompts)
        contenders = {
            "rotserve": rotserve_pass,
            "lm_eval": lm_eval_pass(1, "lm_eval"),
            "lm_eval_batched": lm_eval_pass(32, "lm_eval_batched"),
            "grid": grid_pass,
        }
        # Warm-up on two settings (first calls pay imports and lazy allocations), untimed.
        for fn in contenders.values():
            fn(settings[:2])
        with _quiet():
            rounds = alternate(
                contenders,
                s.capability_rounds,
                0,
                round_logger(ctx, "capability"),
                settle_s=s.settle_s,
                max_external=MAX_EXTERNAL_CORES,
                max_retries=s.capability_rounds,
            )
    finally:
        if engine is not None:
            engine.close()
        server.stop()
    rot = scores["rotserve"]
    agree = {k: sum(rot[a] == v[a] for a in rot) for k, v in scores.items() if k != "rotserve"}
    per_round_grid = [
        r.seconds / g.seconds
        for r, g in zip(rounds.runs["rotserve"], rounds.runs["grid"], strict=True)
    ]
    ctx.details["capability"] = {
        "task": task,
        "model": shape.name,
        "settings": len(settings),
        "requests": ctx.details.pop("capability_requests", None),
        "rounds": s.capability_rounds,
        "engines_up_s": round(engines_up_s, 1),
        "grid_prompts": s.capability_grid_prompts,
        "grid_rows": grid_rows,
        **{name: rounds.summary(name) for name in contenders},
        "paired_ratios": rounds.paired_ratios("rotserve", "lm_eval"),
        "ratio": rounds.ratio("rotserve", "lm_eval"),
        "paired_ratios_vs_batched": rounds.paired_ratios("rotserve", "lm_eval_batched"),
        "ratio_vs_batched": rounds.ratio("rotserve", "lm_eval_batched"),
        "seconds_vs_grid": per_round_grid,
        "vs_grid": statistics.median(per_round_grid),
        # Same scores from both sides at how many settings (the main metric; bf16 kernels that
        # batch differently can flip a near-tie, so this is recorded, not required).
        "same_scores": agree,
        "external_cores_per_round": rounds.external,
        "discarded_rounds": rounds.discarded,
    }


def _main_metric(rows: list[dict[str, Any]]) -> dict[Any, float]:
    return {r["angle"]: r["value"] for r in rows if r["filter"] == "none"}


def _task_manager(include: list[str]) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=False)


def _grid_contender(engine: Any, settings: list, prompts: int) -> tuple[Callable[..., float], int]:
    """The grid's worker on the same engine: P prompts x the settings, 32 tokens, coherence."""
    from rotserve.grid.config import DEFAULT_MAX_TOKENS, PromptSet
    from rotserve.grid.plan import make_plan
    from rotserve.grid.rows import RowContext, generate_shard
    from rotserve.prompts import Prompt

    instructions = bench_instructions(prompts)
    ps = PromptSet(
        "bench", Path("bench"), "", tuple(Prompt(f"p{i}", t) for i, t in enumerate(instructions))
    )
    plan = make_plan([ps], settings, shard_size=prompts * len(settings))
    row_ctx = RowContext("bench", "bench", "bench", DEFAULT_MAX_TOKENS, 0.0, 0, 1)

    def grid_pass(at: list = settings) -> float:
        shard = plan.shards[0] if at is settings else make_plan([ps], at, 10**6).shards[0]
        return float(len(generate_shard(engine, shard, row_ctx)))

    return grid_pass, plan.n_rows


class _quiet:
    """lm-eval's INFO logging per evaluation would flood the bench log."""

    def __enter__(self) -> None:
        import logging

        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


class _Server:
    """`rotserve serve` for the bench model in its own process group (so stop() ends its
    engine process too), with the bench engines' settings."""

    def __init__(self, model: Any, plane: Any, s: Any) -> None:
        from rotserve.serve import build_parser, serve_command

        self.port = _free_port()
        args = build_parser().parse_args(
            ["--model", str(model), "--plane", str(plane), "--port", str(self.port)]
            + ["--dtype", s.dtype]
        )
        passthrough = ["--max-model-len", str(s.max_model_len), "--no-enable-prefix-caching"]
        passthrough += ["--seed", "0"] + (["--enforce-eager"] if s.enforce_eager else [])
        command = serve_command(args, passthrough)
        self.log = open(os.devnull, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            command.argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **command.env},
            start_new_session=True,
        )
        self.ready = False

    def url(self) -> str:
        import urllib.request

        base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while not self.ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rotserve serve exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    self.ready = resp.status == 200
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"rotserve serve did not start in {SERVER_TIMEOUT_S} s")
            if not self.ready:
                time.sleep(1.0)
        return f"{base}/v1/completions"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
