"""`rotserve capability` end to end: the shipped toy tasks (toy_reply_mc, multiple choice;
toy_reply_gen, generation) at every setting of a toy grid run, with real lm-eval, a real vLLM
CPU engine on a real local Ray cluster, against lm-eval's own `local-completions` model talking
to a real `rotserve serve`.

- a run SIGKILLed right after its last answer part (before its scores) resumes, in a new
  process, to the same table without an engine: every (request, setting) answered once and
  every (task, metric, setting) scored once (a kill between parts is the fan-out's, tested once
  in test_fanout.py);
- steering changes the scores, and every log-likelihood, against the baseline;
- the baseline is the unsteered model: its log-likelihoods are the stock HF model's, and its
  scores and answers are what lm-eval gets from the server with the bare model name;
- at each angle, scores and per-item answers are what lm-eval's local-completions gets from
  `rotserve serve` with the model name MODEL@θ (so the resumed table is the uninterrupted one);
- a finished table is rescored from its answers without an engine;
- bad input (unknown task, a task file that does not parse, a run without the settings asked
  for) fails before any engine starts, naming the problem.

Cost on 2 cores: two engine starts (the run's, and the server's, which boots from the module's
start alongside everything else), one index of lm-eval's own tasks (the unknown task),
lm-eval's three local-completions passes: 76-120 s measured with other jobs on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from run_checks import run_killed_job
from vllm_fixtures import free_port, require_vllm, wait_for_health

require_vllm()
pytest.importorskip("lm_eval")

from rotserve.capability import (  # noqa: E402
    CapabilityConfigError,
    read_answers,
    read_capability_manifest,
    read_items,
    read_scores,
    run_capability,
)
from rotserve.capability.cli import build_parser, config_from_args, main  # noqa: E402
from rotserve.capability.table import SCORE_KEY, table_dir  # noqa: E402
from rotserve.paths import shipped_tasks_dir, toy_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = toy_model_dir().resolve()
TASKS = ("toy_reply_mc", "toy_reply_gen")
NAME = "+".join(TASKS)
LIMIT = 12  # documents per task: 6 harmless and 6 harmful requests (the file alternates)
ANGLES = (0.0, 180.0)  # toward refusal, away from it (the toy's plane)
SETTINGS = [None, *ANGLES]  # None: the baseline
N_REQUESTS = 2 * LIMIT + LIMIT  # two choices per MC document, one generation per document
N_ANSWERS = N_REQUESTS * len(SETTINGS)
SHARD = N_REQUESTS  # answers per shard: 3 shards, each 12 requests at every setting
STARTUP_TIMEOUT_S = 600  # engine starts take minutes on a busy 2-core box


@pytest.fixture(scope="module", autouse=True)
def at_repo_root():
    """The shipped tasks' data_files are relative to the repository root, as lm-eval reads them
    (from the current directory)."""
    before = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A toy grid run directory as the grid opens it: its manifest holds the settings (plain
    mask, the toy's plane, ANGLES, baseline), which is all a capability run reads of it."""
    from rotserve.grid.config import GridConfig, resolve
    from rotserve.grid.job import plan_grid
    from rotserve.grid.manifest import build_manifest
    from rotserve.grid.store import RunStore

    out = tmp_path_factory.mktemp("capability") / "run"
    cfg = GridConfig(angles=ANGLES, dtype="float32", enforce_eager=True, out=str(out))
    resolved = resolve(cfg)
    store, _ = RunStore.open(resolved.out, resolved.run_id, False)
    store.write_manifest(build_manifest(resolved, plan_grid(resolved), store.root, None, None))
    store.close()
    return out


def cli_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        str(run_dir),
        "--tasks",
        ",".join(TASKS),
        "--limit",
        str(LIMIT),
        "--shard-size",
        str(SHARD),
        "--engines",
        "1",
        "--no-progress",
        *extra,
    ]


class Server:
    """`rotserve serve` for the toy model in its own process group, started at once and waited
    for on first use, so it boots while the capability runs do."""

    def __init__(self, log_path: Path) -> None:
        from rotserve.serve import build_parser as serve_parser
        from rotserve.serve import serve_command

        self.port = free_port()
        args = serve_parser().parse_args(
            ["--model", str(TOY), "--port", str(self.port), "--dtype", "float32"]
        )
        passthrough = ["--enforce-eager", "--max-model-len", "512"]
        command = serve_command(args, [*passthrough, "--kv-cache-memory-bytes", str(256 << 20)])
        # Its own core: the capability run's engine is pinned to core 0.
        last_core = str((os.cpu_count() or 1) - 1)
        env = {**os.environ, **command.env, "VLLM_CPU_OMP_THREADS_BIND": last_core}
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                command.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.ready = False

    def url(self) -> str:
        if not self.ready:
            try:
                wait_for_health(
                    f"http://127.0.0.1:{self.port}/health", STARTUP_TIMEOUT_S, self.proc
                )
            except (RuntimeError, TimeoutError) as e:
                pytest.fail(f"{e}\n--- server log tail ---\n{self.log_path.read_text()[-4000:]}")
            self.ready = True
        return f"http://127.0.0.1:{self.port}/v1/completions"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def server(tmp_path_factory):
    """Started with the module (autouse): it boots while the first tests and the run go."""
    s = Server(tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def killed(server, ray_cluster, run_dir) -> dict:
    """`rotserve capability RUN_DIR` SIGKILLed right after its last answer part is published,
    before it scores, as a driver of the module's Ray cluster (Ray ends a dead driver's engine
    actor): what it leaves on disk."""
    address = ray_cluster.get_runtime_context().gcs_address
    args = cli_args(run_dir, "--ray-address", address)
    run_killed_job(
        "rotserve.capability.store:CapabilityStore",
        "rotserve.capability.cli",
        args,
        N_ANSWERS // SHARD,
        ROOT,
        STARTUP_TIMEOUT_S,
    )
    tdir = table_dir(run_dir, NAME)
    return {
        "parts": sorted((tdir / "answers").glob("part-*.parquet")),
        "scores": (tdir / "scores.parquet").exists(),
        "manifest": read_capability_manifest(run_dir, NAME),
    }


@pytest.fixture(scope="module")
def resumed(killed, run_dir):
    """The same command rerun in this process: the table."""
    config = config_from_args(build_parser().parse_args(cli_args(run_dir)))
    return run_capability(config, argv=["capability", *cli_args(run_dir)])


def lm_eval_local_completions(server: Server, model_name: str) -> dict:
    """lm-eval's own local-completions model, unmodified, against `rotserve serve`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(shipped_tasks_dir()), include_defaults=False)
    return simple_evaluate(
        model="local-completions",
        model_args={
            "model": model_name,
            "base_url": server.url(),
            "tokenizer_backend": "huggingface",
            "tokenizer": str(TOY),
            "max_length": 512,  # the toy's positions, what rotserve capability uses for it
        },
        tasks=list(TASKS),
        task_manager=manager,
        limit=LIMIT,
        log_samples=True,
    )


@pytest.fixture(scope="module")
def served(server, resumed) -> dict:
    """lm-eval's results per setting through the server: the bare model name (the baseline),
    then MODEL@θ for each angle. Run after the capability run, whose engine is closed by then."""
    return {
        angle: lm_eval_local_completions(server, str(TOY) if angle is None else f"{TOY}@{angle:g}")
        for angle in SETTINGS
    }


def scores_at(table, angle) -> dict[tuple[str, str], float]:
    return {(r["task"], r["metric"]): r["value"] for r in table.to_pylist() if r["angle"] == angle}


def answers_by_item(run_dir: Path) -> dict[tuple, dict]:
    """(angle, task, doc_id, idx) -> the answer row, through items.parquet."""
    items = read_items(run_dir, NAME).to_pylist()
    answers = read_answers(run_dir, NAME).to_pylist()
    by_key = {(a["request_key"], a["angle"]): a for a in answers}
    return {
        (angle, it["task"], it["doc_id"], it["idx"]): by_key[(it["request_keys"][0], angle)]
        for it in items
        for angle in SETTINGS
    }


# --- bad input: a clear error before any engine ----------------------------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_an_unknown_task_is_named_with_close_matches(run_dir, capsys):
    code, err = run_cli([*cli_args(run_dir)[:1], "--tasks", "toy_reply_mcq", "--name", "x"], capsys)
    assert code == 2
    assert "unknown task 'toy_reply_mcq' (did you mean toy_reply_mc" in err
    assert not table_dir(run_dir, "x").exists()


def test_a_task_file_that_does_not_parse_is_named(run_dir, tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("task: broken\ndataset_path: json\n  oops: [\n")
    args = [str(run_dir), "--tasks", "broken", "--include-path", str(tmp_path), "--name", "y"]
    code, err = run_cli(args, capsys)
    assert code == 2
    assert f"task file {tmp_path / 'broken.yaml'} does not parse" in err
    assert not table_dir(run_dir, "y").exists()


def test_a_run_without_the_settings_asked_for_is_refused(run_dir, capsys):
    code, err = run_cli([*cli_args(run_dir), "--angle-list", "0,45", "--name", "z"], capsys)
    assert code == 2
    assert "the run has no angle 45° (its angles: 0, 180)" in err
    code, err = run_cli([*cli_args(run_dir), "--mask", "adaptive", "--name", "z"], capsys)
    assert code == 2 and "the run has no adaptive mask (its masks: plain)" in err
    code, err = run_cli([*cli_args(run_dir), "--plane", "maxsim", "--name", "z"], capsys)
    assert code == 2 and "the run has no plane 'maxsim' (its planes: default)" in err
    assert not table_dir(run_dir, "z").exists()


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    config = config_from_args(build_parser().parse_args(["--tasks", "toy_reply_mc", str(tmp_path)]))
    with pytest.raises(CapabilityConfigError, match="holds no grid manifest.json: not a run"):
        run_capability(config)


def test_settings_of_a_model_need_no_run(tmp_path):
    """--model without RUN_DIR resolves the grid's way: a bad plane fails like `rotserve grid`."""
    from rotserve.capability.config import resolve

    args = ["--model", str(TOY), "--plane", str(tmp_path / "missing.safetensors")]
    config = config_from_args(build_parser().parse_args([*args, "--tasks", "toy_reply_mc"]))
    with pytest.raises(CapabilityConfigError, match="missing.safetensors: file not found"):
        resolve(config)


# --- the pieces, without an engine ---------------------------------------------------------


def test_shards_hold_every_request_at_every_setting_once():
    from rotserve.capability.plan import LOGLIKELIHOOD, EngineRequest, make_capability_plan
    from rotserve.grid.plan import conditions

    requests = [EngineRequest.of(LOGLIKELIHOOD, [1, 2, i], n_continuation=1) for i in range(7)]
    settings = conditions((0.0, 90.0), (False, True), True)
    plan = make_capability_plan(requests, settings, shard_size=4)
    units = [(r.key, s) for shard in plan.shards for r, s in shard.units()]
    assert len(units) == len(set(units)) == plan.n_rows == 7 * 5
    assert [len(shard.units()) for shard in plan.shards] == [4] * 8 + [3]
    # request-major: a shard asks few requests, each at every setting it reaches
    assert {s for _, s in plan.shards[0].units()} == set(settings[:4])
    again = make_capability_plan(requests, settings, shard_size=4)
    assert again.fingerprint == plan.fingerprint
    assert make_capability_plan(requests[::-1], settings, 4).fingerprint != plan.fingerprint


def write_task(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ("one two three four five six", "seven"))
    )
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / name}.jsonl\ntest_split: test\n{body}"
    )


def test_a_group_is_scored_once_and_a_rolling_loglikelihood_sums_its_windows(tmp_path):
    """lm-eval's own scoring of replayed answers: a group's aggregate is one row (lm-eval lists
    it twice), and a perplexity task's document is the sum of its windows' answers."""
    from transformers import AutoTokenizer

    from rotserve.capability.tasks import (
        EvalOptions,
        instance_answers,
        load_tasks,
        record_requests,
        score,
    )

    write_task(
        tmp_path,
        "rolling",
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n",
    )
    (tmp_path / "both.yaml").write_text(
        "group: both\ntask:\n  - toy_reply_mc\n  - rolling\naggregate_metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n"
    )
    tokenizer = AutoTokenizer.from_pretrained(TOY)
    loaded = load_tasks(["both"], [str(shipped_tasks_dir()), str(tmp_path)])
    options = EvalOptions(max_length=5, limit=2)  # windows of 3 tokens: a document takes several
    recorded = record_requests(loaded, tokenizer, options)
    rolling = [it for it in recorded.items if it["task"] == "rolling"]
    assert len(rolling) == 2 and len(rolling[0]["request_keys"]) > 1
    answers = {r.key: {"logprob": -1.0, "is_greedy": True} for r in recorded.requests}
    per_instance = instance_answers(recorded.items, answers)
    assert per_instance[rolling[0]["instance_key"]] == -len(rolling[0]["request_keys"])
    rows = score(loaded, tokenizer, per_instance, options)
    keys = [(r["task"], r["metric"], r["filter"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert [r["is_group"] for r in rows if r["task"] == "both"] == [True]


# --- a killed run resumes to one complete table --------------------------------------------


def test_a_run_killed_before_its_scores_leaves_its_answers_and_no_scores(killed):
    assert len(killed["parts"]) == N_ANSWERS // SHARD
    assert all(pq.read_metadata(p).num_rows == SHARD for p in killed["parts"])
    assert not killed["scores"]
    assert killed["manifest"]["status"] == "running"


def test_the_resumed_table_has_every_answer_and_every_score_once(resumed, run_dir):
    """The rerun (a new process: the plan, and so the capability id, must come out the same)
    finds every answer on disk, starts no engine, and scores."""
    assert resumed.state == "resume" and resumed.shards_written == 0
    assert resumed.shards_skipped == resumed.shards_total == N_ANSWERS // SHARD
    answers = read_answers(run_dir, NAME)
    keys = list(
        zip(*(answers.column(c).to_pylist() for c in ("request_key", "angle")), strict=True)
    )
    assert answers.num_rows == len(set(keys)) == N_ANSWERS
    scores = read_scores(run_dir, NAME)
    score_keys = list(zip(*(scores.column(c).to_pylist() for c in SCORE_KEY), strict=True))
    assert len(score_keys) == len(set(score_keys)) == len(TASKS) * len(SETTINGS)
    assert sorted({(r["task"], r["metric"], r["filter"]) for r in scores.to_pylist()}) == [
        ("toy_reply_gen", "exact_match", "reply"),
        ("toy_reply_mc", "acc", "none"),
    ]
    assert set(scores.column("n_samples").to_pylist()) == {LIMIT}
    assert set(scores.column("run_id").to_pylist()) == {resumed.run_id}
    manifest = json.loads(resumed.manifest_path.read_text())
    assert manifest["status"] == "complete"
    assert [a["state"] for a in manifest["attempts"]] == ["new", "resume"]
    assert manifest["attempts"][-1]["engines"] == 0


def test_steering_changes_the_scores_and_every_loglikelihood(resumed, run_dir):
    scores = read_scores(run_dir, NAME)
    base = scores_at(scores, None)
    assert base[("toy_reply_mc", "acc")] >= 0.75  # the unsteered toy picks the fitting reply
    for angle in ANGLES:  # 0°: harmless requests refused; 180°: harmful ones answered
        steered = scores_at(scores, angle)
        assert steered[("toy_reply_mc", "acc")] < base[("toy_reply_mc", "acc")], angle
        assert steered[("toy_reply_gen", "exact_match")] < base[("toy_reply_gen", "exact_match")]
    by_item = answers_by_item(run_dir)
    for (angle, task, doc, idx), row in by_item.items():
        if angle is not None and row["kind"] == "loglikelihood":
            assert row["logprob"] != by_item[(None, task, doc, idx)]["logprob"], (angle, doc)


def test_the_baseline_is_the_stock_model(resumed, run_dir):
    """Every baseline log-likelihood is the stock HF model's (transformers, no vLLM, no plugin)
    over the request's tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from rotserve.capability.config import resolve

    config = config_from_args(build_parser().parse_args(cli_args(run_dir)))
    requests = {r.key: r for r in resolve(config, log=lambda _: None).plan.requests}
    model = AutoModelForCausalLM.from_pretrained(TOY, dtype=torch.float32).eval()
    baseline = [
        a
        for a in read_answers(run_dir, NAME).to_pylist()
        if a["angle"] is None and a["kind"] == "loglikelihood"
    ]
    assert len(baseline) == 2 * LIMIT
    for row in baseline:
        req = requests[row["request_key"]]
        ids = req.token_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        start = len(ids) - req.n_continuation
        expected = sum(logprobs[j - 1, ids[j]].item() for j in range(start, len(ids)))
        assert abs(row["logprob"] - expected) < 1e-3, (row["request_key"], row["logprob"], expected)


# --- parity with lm-eval's local-completions against rotserve serve --------------------------


@pytest.mark.parametrize("angle", SETTINGS, ids=["baseline", *(f"{a:g}deg" for a in ANGLES)])
def test_scores_equal_lm_eval_local_completions_against_rotserve_serve(
    resumed, run_dir, served, angle
):
    """At each setting (MODEL@θ, and the bare name for the baseline) lm-eval's own
    local-completions scores what rotserve capability scored, and answered every request the
    same: each choice's log-likelihood and greediness, each generation's text."""
    ours = scores_at(read_scores(run_dir, NAME), angle)
    results = served[angle]
    theirs = {
        ("toy_reply_mc", "acc"): results["results"]["toy_reply_mc"]["acc,none"],
        ("toy_reply_gen", "exact_match"): results["results"]["toy_reply_gen"]["exact_match,reply"],
    }
    assert ours == theirs
    by_item = answers_by_item(run_dir)
    for task in TASKS:
        samples = results["samples"][task]
        assert len(samples) == LIMIT
        for s in samples:
            for idx, resp in enumerate(s["resps"]):
                row = by_item[(angle, task, s["doc_id"], idx)]
                if task == "toy_reply_gen":
                    assert row["generation"] == resp[0], (angle, s["doc_id"])
                else:
                    logprob, greedy = resp[0]
                    assert abs(row["logprob"] - logprob) < 1e-5, (angle, s["doc_id"], idx)
                    assert row["is_greedy"] == greedy


def test_a_finished_table_is_rescored_without_an_engine(resumed, run_dir):
    before = read_scores(run_dir, NAME)
    config = config_from_args(build_parser().parse_args(cli_args(run_dir)))
    again = run_capability(config)
    assert again.state == "resume" and again.shards_written == 0
    assert again.shards_skipped == again.shards_total
    manifest = json.loads(again.manifest_path.read_text())
    assert manifest["attempts"][-1]["engines"] == 0  # no engine started
    assert read_scores(run_dir, NAME).equals(before)
