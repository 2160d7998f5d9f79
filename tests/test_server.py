"""`vllm serve` with the rotserve plugin: an OpenAI-compatible server, one angle per request.

Starts the real server in a subprocess on 127.0.0.1 (free port), waits for /health, sends
requests with different angles through the `openai` client and compares every completion,
token for token, with the HF hook generator (the oracle). Over HTTP the angle rides in
`extra_body={"vllm_xargs": {"rotserve_angle": ..., "rotserve_adaptive": ...}}`: vllm_xargs
only carries flat str -> scalar entries, hence the flat keys.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from vllm_fixtures import ENGINE_KWARGS, INSTRUCTIONS, free_port, require_vllm, wait_for_health

require_vllm()
pytest.importorskip("openai")

from rotserve.serve import build_parser, serve_command  # noqa: E402
from rotserve.vllm_plugin.config import TRACKER_FQCN  # noqa: E402

MAX_TOKENS = 24
STARTUP_TIMEOUT_S = 420  # engine start is 15 s on an idle 2-core box, minutes on a busy one


@pytest.fixture(scope="module")
def server(tiny_qwen2, tiny_plane, tmp_path_factory):
    """(base_url, model name) of a running `vllm serve` with the rotated Qwen2."""
    port = free_port()
    # The command `rotserve serve` would exec: its checks, its --hf-overrides and tracker.
    args = build_parser().parse_args(
        ["--model", str(tiny_qwen2), "--plane", str(tiny_plane), "--port", str(port)]
        + ["--dtype", ENGINE_KWARGS["dtype"]]
    )
    passthrough = ["--max-model-len", str(ENGINE_KWARGS["max_model_len"])]
    passthrough += ["--kv-cache-memory-bytes", str(ENGINE_KWARGS["kv_cache_memory_bytes"])]
    cmd = serve_command(args, [*passthrough, "--seed", "0"])
    assert cmd[cmd.index("--logits-processors") + 1] == TRACKER_FQCN
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log:
        # Own process group, so the teardown stops the server and its engine processes,
        # and nothing else.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
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
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            _complete(client, model, prompt, xargs)
        assert needle in str(err.value)
    assert _complete(client, model, prompt, {"rotserve_angle": 90.0}) == before


def test_long_prompt_with_per_angle_cache_salt(server, client, oracle):
    """Prefix caching is on in the server: HTTP clients salt the cache per angle themselves
    (RotServeEngine does it for Python users). Same ~280-token prompt at two angles."""
    _, model = server
    words = " ".join(f"item {i} is a {w}" for i, w in enumerate(["red apple", "blue car"] * 13))
    prompt = f"Summarise this list. {words}"
    first = _complete(client, model, prompt, {"rotserve_angle": 90.0}, cache_salt="angle-90")
    second = _complete(client, model, prompt, {"rotserve_angle": 250.0}, cache_salt="angle-250")
    for angle, tokens in ((90.0, first), (250.0, second)):
        ref = oracle.generate([prompt], [angle], max_new_tokens=MAX_TOKENS)[0]
        assert tokens == ref.token_ids, f"angle={angle}"
