"""The two kinds of steering mistake: an engine's settings, and one request's arguments.

They sit below every other module of the package so that the architecture table and the
window grammar can subclass them without an import cycle.
"""

from __future__ import annotations


class RotServeConfigError(ValueError):
    """Engine-level settings that cannot work; the message says what to pass instead."""


class RequestSteeringError(ValueError):
    """A request's rotserve arguments are invalid (the engine rejects that request only)."""
