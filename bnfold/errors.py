"""The exceptions bnfold raises for bad input and failed verification, and how the commands report them,
importable without numpy, onnx or torch (the CLI's start-up)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NoReturn

import click

from bnfold.limits import memory_hint
from bnfold.report import printable

if TYPE_CHECKING:
    from bnfold.verification import Verification

# Every command's exit code for bad usage or bad input (an InputError), as linters use it.
EXIT_BAD_INPUT = 2


def describe_error(error: BaseException, text: str | None = None) -> str:
    """``Type: first line`` of the error's message, or of ``text``: the useful part of a wordy message, for
    findings and input errors (tracebacks belong to bugs, not to models)."""
    lines = (str(error) if text is None else text).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def internal_error(error: BaseException) -> str:
    """The message for an exception that is a bug in bnfold, not bad input."""
    return f"internal error ({describe_error(error)}); please report it"


def echo(text: str, err: bool = False) -> None:
    """``click.echo``, where a reader that closed the pipe (``bnfold verify A B | head -1``) ends the output, not
    the command: the rest goes nowhere and the exit code stays the verdict's (it was an internal error, exit 2).
    A stream that cannot be written otherwise (stdout on a full disk, stderr closed) goes nowhere from then on
    too; stdout's failure is then the command's, exit 2 (what it printed, a report, is lost)."""
    try:
        click.echo(text, err=err)
    except OSError as error:
        stream_failed(error, sys.stderr if err else sys.stdout)


def stream_failed(error: OSError, stream) -> None:
    """After ``error`` writing ``stream``: it goes nowhere from then on; for stdout not lost to a closed pipe, the
    command fails, exit 2."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # (Python flushes it again at exit)
    except (AttributeError, OSError, ValueError):  # (no stream at all: a descriptor closed at start-up)
        pass
    if stream is sys.stdout and not isinstance(error, BrokenPipeError):
        fail(f"<stdout>: cannot write ({error.strerror or describe_error(error)})")


def echo_error(message: str) -> None:
    """``bnfold: error: MESSAGE`` on stderr, one line: names quoted from model files are escaped."""
    echo(f"bnfold: error: {printable(memory_hint(message))}", err=True)


# What ``--format json`` prints on stdout when a command fails with bad input, so that stdout is always JSON.
ERROR_SCHEMA = "bnfold.error/1"


def fail(message: str, code: int = EXIT_BAD_INPUT, output_format: str = "text") -> NoReturn:
    """:func:`echo_error`, then exit with ``code``; with ``output_format`` "json", the error as JSON on stdout too."""
    echo_error(message)
    if output_format == "json":
        echo_error_json(message, code)
    sys.exit(code)


def echo_error_json(message: str, code: int) -> None:
    """The ``bnfold.error/1`` object on stdout, for a failure under ``--format json``."""
    import json

    echo(json.dumps({"schema": ERROR_SCHEMA, "error": printable(memory_hint(message)), "exit_code": code}))


class InputError(Exception):
    """Bad input or output path: one line naming the file and the problem (CLI exit code 2)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class MissingInputError(InputError, FileNotFoundError):
    """A named input file does not exist: caught as an :class:`InputError` or a ``FileNotFoundError``."""


def file_status(path: str | os.PathLike) -> os.stat_result | None:
    """``os.stat`` of a path the user named (symlinks followed); None when nothing is there. :class:`InputError`
    naming it when the system cannot look it up (a name too long, a loop of symlinks, a folder it may not enter),
    which pathlib's ``exists()`` and ``is_file()`` raise as they are."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as error:  # (ValueError: a NUL byte in the name)
        raise InputError(path, f"cannot be looked up ({error.strerror.lower() if getattr(error, 'strerror', None) else error})") from None


class VerificationError(RuntimeError):
    """The folded model does not reproduce the original within tolerance, or nothing could be compared.
    ``model`` is the folded model, for a pipeline to inspect."""

    def __init__(self, verification: Verification, report=None, model=None):
        super().__init__(verification.reason)
        self.verification = verification
        self.report = report
        self.model = model

    def __str__(self) -> str:
        # The reason as of now: the command line names its own flags (Verification.overrides) before printing.
        return self.verification.reason


class VerificationUnavailableError(RuntimeError):
    """Nothing can be proven either way: onnxruntime cannot run the original model, or no random inputs
    can be made for it (no shape, a size below 1, or past the memory budget); or (``model`` "folded") the
    folded model, the candidate of ``bnfold verify``, has a tensor that cannot be read or onnxruntime cannot run it."""

    def __init__(self, message: str, model: str = "original"):
        super().__init__(message)
        self.model = model
