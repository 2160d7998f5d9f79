"""The package version. A module of its own so that modules the package root imports (plane.py
records the version in every plane it saves) read it without importing the root."""

__version__ = "0.1.0"
