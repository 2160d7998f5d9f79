"""What `rotserve serve` does to every HTTP request before vLLM sees it.

Two things an OpenAI client cannot be trusted (or is not able) to do itself:

1. **A prefix-cache salt per steering.** vLLM's prefix-cache key covers the tokens, the LoRA
   and `cache_salt`, not `vllm_xargs`: without a salt, a prompt sent at 0° and then at 150°
   would reuse the 0° KV cache and give a wrong 150° completion. So every steered request gets
   `cache_salt = "rotserve:<plane id>:<mode>:<plain|adaptive>:<angle>"` (the salt RotServeEngine
   uses), joined with the client's own salt if it sent one. Requests with the same steering
   still share cached prefixes; unsteered requests keep the client's salt, as the stock model.
2. **Angles by model name**, for clients that cannot send `extra_body` (lm-eval-harness,
   LangChain, curl scripts): `MODEL@150`, `MODEL@150:adaptive`, `MODEL@30:relative`,
   `MODEL@none`. The suffix becomes the same `vllm_xargs` keys a client could send, and the
   model name goes on to vLLM without it; a malformed suffix is an HTTP 400 naming the grammar.

3. **The start-up canary** (rotserve.canary) on the server's own engine: when the app's
   lifespan reports start-up complete, the middleware first probes the engine (prefill and
   decode steered, a mixed batch equal to requests alone); if that fails it reports start-up
   failed instead, so uvicorn exits before serving a single wrong completion.

`SteeringMiddleware` is a plain ASGI middleware, given to vLLM's server with `--middleware`; it
reads the plane id from ROTSERVE_PLANE_ID, which `rotserve serve` sets. The rewriting itself
(`steer_request`) is a pure function of the JSON body, tested without a server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from rotserve.steering import (
    FLAT_PREFIX,
    PlaneCatalog,
    RequestSteeringError,
    parse_request,
)

PLANE_ID_ENV = "ROTSERVE_PLANE_ID"
CATALOG_ENV = "ROTSERVE_CATALOG"  # PlaneCatalog JSON: planes and windows a request may name
STEERED_PATHS = ("/v1/completions", "/v1/chat/completions")
MODELS_PATH = "/v1/models"
MAX_SALT_LENGTH = 128  # vLLM refuses longer cache salts
NAME_FLAGS = ("adaptive", "relative")
NAME_GRAMMAR = (
    "MODEL@ANGLE[:adaptive][:relative][:plane=NAME][:layers=WINDOW] or MODEL@none, ANGLE in "
    "degrees, WINDOW all, none or a comma list (e.g. MODEL@150, MODEL@150:adaptive, "
    "MODEL@30:relative, MODEL@150:plane=maxsim:layers=8,9,10)"
)
NAME_KEYS = ("plane", "layers")  # key=value parts of a model-name steering

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ModelNameError(RequestSteeringError):
    """A model name whose @-suffix does not follow NAME_GRAMMAR."""


def split_model_name(name: str) -> tuple[str, dict[str, Any] | None]:
    """`MODEL@150:adaptive` -> ("MODEL", flat vllm_xargs); no suffix -> (name, None).

    `MODEL@none` -> ("MODEL", {}): unsteered, said explicitly.
    """
    if "@" not in name:
        return name, None
    base, _, spec = name.rpartition("@")
    head, *flags = spec.split(":")
    if not base or not head:
        raise ModelNameError(f"model {name!r}: expected {NAME_GRAMMAR}")
    if head.lower() == "none":
        if flags:
            raise ModelNameError(f"model {name!r}: @none takes no flags; expected {NAME_GRAMMAR}")
        return base, {}
    try:
        angle = float(head)
    except ValueError:
        raise ModelNameError(
            f"model {name!r}: {head!r} is not a number of degrees; expected {NAME_GRAMMAR}"
        ) from None
    keyed = dict(f.split("=", 1) for f in flags if "=" in f)
    flags = [f for f in flags if "=" not in f]
    unknown = [f for f in flags if f not in NAME_FLAGS] + [k for k in keyed if k not in NAME_KEYS]
    if not math.isfinite(angle) or unknown or len(set(flags)) != len(flags):
        raise ModelNameError(f"model {name!r}: expected {NAME_GRAMMAR}")
    return base, {
        f"{FLAT_PREFIX}angle": angle,
        f"{FLAT_PREFIX}adaptive": "adaptive" in flags,
        f"{FLAT_PREFIX}mode": "relative" if "relative" in flags else "absolute",
        **{f"{FLAT_PREFIX}{k}": v for k, v in keyed.items()},
    }


def steer_request(
    body: dict[str, Any], plane_id: str, catalog: PlaneCatalog | None = None
) -> dict[str, Any]:
    """The request body vLLM should see: the model-name suffix moved into vllm_xargs, and a
    prefix-cache salt derived from the steering (and the client's salt). Raises
    RequestSteeringError (an HTTP 400) for a malformed suffix or malformed rotserve keys,
    and, given the engine's catalog, for an unknown plane or an unsteerable layer (the salt
    then names the resolved plane id and window)."""
    body = dict(body)
    xargs = dict(body.get("vllm_xargs") or {})
    model = body.get("model")
    if isinstance(model, str):
        base, named = split_model_name(model)
        if named is not None:
            given = sorted(k for k in xargs if k.startswith(FLAT_PREFIX))
            if given:
                raise ModelNameError(
                    f"model {model!r} names a steering and vllm_xargs has {', '.join(given)}: "
                    "give it one way"
                )
            body["model"] = base
            xargs.update(named)
    if xargs:
        body["vllm_xargs"] = xargs
    steering = parse_request(xargs)
    salt = (
        catalog.resolve(steering).cache_salt()
        if catalog is not None
        else steering.cache_salt(plane_id)
    )
    client_salt = body.get("cache_salt")
    if salt is not None and (client_salt is None or isinstance(client_salt, str)):
        body["cache_salt"] = _join_salts(salt, client_salt)  # (vLLM rejects a non-string salt)
    return body


def _join_salts(steering_salt: str, client_salt: str | None) -> str:
    """The steering's salt, then the client's; vLLM caps a salt at 128 characters, so a client
    salt that would not fit is replaced by its hash (still one salt per client salt)."""
    if not client_salt:
        return steering_salt
    joined = f"{steering_salt}|{client_salt}"
    if len(joined) <= MAX_SALT_LENGTH:
        return joined
    return f"{steering_salt}|{hashlib.sha256(client_salt.encode()).hexdigest()[:32]}"


def annotate_models(listing: dict[str, Any]) -> dict[str, Any]:
    """/v1/models: each served model also says how to pick an angle by name."""
    for entry in listing.get("data") or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            entry["rotserve"] = {
                "angle_by_name": NAME_GRAMMAR.replace("MODEL", entry["id"]),
                "angle_by_body": 'extra_body={"vllm_xargs": {"rotserve_angle": 150}}',
            }
    return listing


class SteeringMiddleware:
    """ASGI middleware: rewrite steered request bodies, annotate the model listing."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.plane_id = os.environ.get(PLANE_ID_ENV)
        catalog = os.environ.get(CATALOG_ENV)
        self.catalog = PlaneCatalog.from_json(catalog) if catalog else None
        if not self.plane_id:
            raise RuntimeError(
                f"{PLANE_ID_ENV} is not set: start the server with `rotserve serve`, which sets "
                "it, or set it to the plane's id (rotserve.load_plane(path).plane_id)"
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, _canary_before_startup(scope, send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST" and scope["path"] in STEERED_PATHS:
            return await self._steered(scope, receive, send)
        if scope["method"] == "GET" and scope["path"] == MODELS_PATH:
            return await self.app(scope, receive, _rewriting_json(send, annotate_models))
        return await self.app(scope, receive, send)

    async def _steered(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # not JSON: vLLM answers it as it would
        if isinstance(body, dict):
            try:
                raw = json.dumps(steer_request(body, self.plane_id, self.catalog)).encode()
            except RequestSteeringError as e:
                return await _send_json(send, 400, _error(str(e)))
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        scope = {**scope, "headers": headers}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later messages: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)


def _canary_before_startup(scope: Scope, send: Send) -> Send:
    """A lifespan send that runs the canary before it lets "startup complete" through."""

    async def send_after_canary(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            from rotserve.canary import CanaryError, async_executor, run_canary_async

            log = logging.getLogger("uvicorn.error")  # uvicorn's configured logger
            state = scope["app"].state  # Starlette puts the app in every scope
            try:
                report = await run_canary_async(
                    async_executor(state.engine_client), state.vllm_config
                )
                report.raise_if_failed()
            except Exception as e:  # a canary that cannot even run is a failure too
                reason = str(e) if isinstance(e, CanaryError) else f"{type(e).__name__}: {e}"
                log.error("rotserve: %s", reason)
                message = {"type": "lifespan.startup.failed", "message": reason}
            else:
                log.info(
                    "rotserve: canary passed in %.2f s (%s): prefill and decode steered, "
                    "a mixed batch equals requests alone",
                    report.seconds,
                    report.describe_stack(),
                )
        await send(message)

    return send_after_canary


async def _read_body(receive: Receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _error(message: str) -> dict[str, Any]:
    """vLLM's own error shape, so OpenAI clients raise BadRequestError with this message."""
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _rewriting_json(send: Send, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> Send:
    """A send that buffers a JSON response and passes it through `rewrite` (others untouched)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def rewriting_send(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        data = b"".join(chunks)
        if start.get("status") == 200:
            try:
                data = json.dumps(rewrite(json.loads(data))).encode()
            except (ValueError, TypeError, AttributeError):
                pass  # not the JSON we expected: send it as it came
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(data)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    return rewriting_send
