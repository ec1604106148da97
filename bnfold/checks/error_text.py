"""Exceptions in one line, for findings and input errors (tracebacks belong to bugs, not to models)."""

from __future__ import annotations


def describe_error(error: Exception, text: str | None = None) -> str:
    """``Type: first line`` of the error's message, or of ``text``: the useful part of a wordy message."""
    lines = (str(error) if text is None else text).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
