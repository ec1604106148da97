"""The exceptions bnfold raises for bad input, importable without numpy, onnx or torch (the CLI's start-up)."""

from __future__ import annotations

import os


class InputError(Exception):
    """Bad input or output path: one line naming the file and the problem (CLI exit code 2)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class MissingInputError(InputError, FileNotFoundError):
    """A named input file does not exist: caught as an :class:`InputError` or a ``FileNotFoundError``."""
