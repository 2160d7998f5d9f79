"""Helpers for the benchmark's child processes (`python -m benchmarks.<module>`)."""

from __future__ import annotations

import os
from pathlib import Path


def child_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m benchmarks.<module>` children: benchmarks/ is a repository
    folder, not an installed package, so the repository root goes first on PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, **extra, "PYTHONPATH": root + (os.pathsep + path if path else "")}
