"""Errors the toolkit raises for bad input; the CLI prints them as one line."""

__all__ = ["CheckpointError", "MobileNetError"]


class MobileNetError(ValueError):
    """Bad input from the user: an unknown model, a bad flag value, a missing file."""


class CheckpointError(MobileNetError):
    """A checkpoint that cannot be read or does not fit the model."""
