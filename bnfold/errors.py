"""The exceptions bnfold raises for bad input, and how the commands report them, importable without numpy,
onnx or torch (the CLI's start-up)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click

from bnfold.report import printable

# Every command's exit code for bad usage or bad input (an InputError), as linters use it.
EXIT_BAD_INPUT = 2


def describe_error(error: BaseException, text: str | None = None) -> str:
    """``Type: first line`` of the error's message, or of ``text``: the useful part of a wordy message, for
    findings and input errors (tracebacks belong to bugs, not to models)."""
    lines = (str(error) if text is None else text).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def echo_error(message: str) -> None:
    """``bnfold: error: MESSAGE`` on stderr, one line: names quoted from model files are escaped."""
    click.echo(f"bnfold: error: {printable(message)}", err=True)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """:func:`echo_error`, then exit with ``code``."""
    echo_error(message)
    sys.exit(code)


class InputError(Exception):
    """Bad input or output path: one line naming the file and the problem (CLI exit code 2)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class MissingInputError(InputError, FileNotFoundError):
    """A named input file does not exist: caught as an :class:`InputError` or a ``FileNotFoundError``."""
