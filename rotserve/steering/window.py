"""The one layer-window grammar, for requests and for every `--layers` flag.

A window is `all`, `none` (no layer), `a:b` (a Python slice: negatives count from the end,
either end may be empty) or a list `3,4,5` (negatives count from the end too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rotserve.steering.errors import RequestSteeringError

GRAMMAR = (
    "'all', 'none', 'a:b' (a Python slice) or '3,4,5' (a list), negative layers counting "
    "from the end"
)


class WindowError(RequestSteeringError):
    """A layer window that cannot be read, or that names a layer the model lacks.

    A RequestSteeringError, so a bad window in a request rejects that request only.
    """


def canonical_window(value: Any, name: str = "layers") -> str:
    """A layer window in one spelling: "all", "none", "a:b" or "3,4,5" (see GRAMMAR).

    Accepts those strings (any case, spaces ignored), an int, or a list of ints; raises
    WindowError naming `name` otherwise.
    """
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise _grammar_error(value, name)
        return ",".join(str(int(i)) for i in value) if value else "none"
    if not isinstance(value, str):
        raise _grammar_error(value, name)
    text = value.replace(" ", "").lower()
    if text in ("all", "none"):
        return text
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 2:
                raise ValueError
            a, b = (int(p) if p else None for p in parts)
            return f"{'' if a is None else a}:{'' if b is None else b}"
        return ",".join(str(int(x)) for x in text.split(","))
    except ValueError:
        raise _grammar_error(value, name) from None


def window_layers(value: Any, num_layers: int, name: str | None = None) -> list[int]:
    """Absolute, sorted layers of a window in a `num_layers`-layer model (may be empty).

    A slice keeps Python's semantics (out-of-range ends are clipped); a listed layer outside
    the model is a WindowError. `name` (the flag or field) starts every message.
    """
    spec = canonical_window(value, name or "layers")
    if spec == "all":
        return list(range(num_layers))
    if spec == "none":
        return []
    if ":" in spec:
        a, b = (int(p) if p else None for p in spec.split(":"))
        return list(range(num_layers))[slice(a, b)]
    return absolute_layers([int(x) for x in spec.split(",")], num_layers, name)


def absolute_layers(
    layers: Sequence[int] | None, num_layers: int, name: str | None = None
) -> list[int]:
    """Listed layers (None: every layer) as absolute, sorted, distinct indices."""
    if layers is None:
        return list(range(num_layers))
    chosen = set()
    for i in layers:
        if not -num_layers <= i < num_layers:
            where = f"{name}: " if name else ""
            raise WindowError(
                f"{where}layer {i} is out of range: the model has {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1} or negative from the end)"
            )
        chosen.add(i % num_layers)
    return sorted(chosen)


def parse_window(value: Any, num_layers: int, name: str = "--layers") -> list[int]:
    """A command-line window: absolute sorted layers, refusing a window that selects none."""
    layers = window_layers(value, num_layers, name)
    if not layers:
        raise WindowError(f"{name} {value!r} selects none of the model's {num_layers} layers")
    return layers


def layer_ranges(layers: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> "0-2.5.7-8" (short, and free of the characters a salt may not hold)."""
    out: list[tuple[int, int]] = []
    for i in sorted(layers):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return ".".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def _grammar_error(value: Any, name: str) -> WindowError:
    return WindowError(f"{name} must be a layer window: {GRAMMAR}; got {value!r}")
