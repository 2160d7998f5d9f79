"""The fan-out's own errors: a request it cannot place, and a run it could not finish."""

from __future__ import annotations


class ExecutionConfigError(ValueError):
    """Where-to-run options that cannot work (a bad count, engines that do not fit the
    cluster); the message names the flag and what to pass instead."""


class FanOutError(RuntimeError):
    """A fan-out could not finish; finished parts are kept and a rerun resumes from them."""
