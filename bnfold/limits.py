"""The command line's limits on one run: ``--max-memory`` and ``--timeout`` (or ``BNFOLD_MAX_MEMORY``,
``BNFOLD_TIMEOUT``), for models that ask more than a machine or a CI job should give.

A model file decides what the runs of verification and ``check`` allocate and for how long: a 417-byte ONNX model
whose ``ConstantOfShape`` makes a 40000x40000 tensor peaks at 13 GB in onnxruntime, a ``.pt2`` program calling
``torch.ones(40000, 40000)`` at 6.6 GB in torch, and nothing in a file bounds a Loop's iterations.

- **Memory** is the process's data limit (``RLIMIT_DATA``: its heap and private mappings), which numpy, torch,
  onnxruntime and protobuf all allocate from: past it an allocation fails at once, and the command says so on one
  line (exit 2) instead of the machine swapping or the kernel killing the process. By default the limit is the
  memory the machine has free as the command starts (available memory and free swap), so a model the machine
  could run is never refused; a CI job sets a tighter one.
- **Time**: at the limit the run stops as on Ctrl-C (onnxruntime at its next node, torch at its next operator),
  scratch files are removed, nothing is written, exit 2.

Both hold while one command runs and are lifted after it (the command line also runs in-process, in tests and
notebooks).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator

import click

try:
    import resource
except ImportError:  # (Windows: no data limit to set)
    resource = None

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class TimeLimitReached(KeyboardInterrupt):
    """The ``--timeout`` came: unwinds as an interrupt does (an ``except Exception`` does not stop it, and a
    running onnxruntime session is told to stop), and the command says which limit it was."""


def limit_options(command):
    """``--max-memory`` and ``--timeout`` for a command that runs models: each holds from when the options are read
    until the command's context closes."""
    options = [
        click.option("--max-memory", metavar="SIZE", envvar="BNFOLD_MAX_MEMORY", callback=_limit_memory, expose_value=False,
                     help="Most memory the run may allocate (libraries included), e.g. 4G or 512M, or 'none' [default: the "
                          "memory the machine has free at start; env BNFOLD_MAX_MEMORY]."),
        click.option("--timeout", metavar="SECONDS", type=click.FloatRange(min=0, max=1e9, min_open=True), envvar="BNFOLD_TIMEOUT",
                     callback=_limit_time, expose_value=False,
                     help="Stop (exit 2, nothing written) after this many seconds [env BNFOLD_TIMEOUT]."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


# ctx.meta key: the memory limit in force (bytes), which an error line names when an allocation failed.
_MAX_MEMORY = "bnfold.max_memory"


def _limit_memory(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    try:
        size = free_memory() if value is None else parse_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None
    if size is not None and resource is not None:
        ctx.meta[_MAX_MEMORY] = size
        ctx.with_resource(_data_limit(size))


def _limit_time(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    if value is not None and value != value:  # (NaN passes every range check)
        raise click.BadParameter("nan is not a number of seconds", ctx, param)
    if value is not None and not hasattr(signal, "setitimer"):
        raise click.BadParameter("not available on this platform (no interval timer)", ctx, param)
    if value is not None:
        ctx.with_resource(_alarm(value, ctx))


def parse_size(text: str) -> int | None:
    """Bytes in ``text``: a number with an optional binary unit (``4G``, ``1.5GiB``, ``512M``, ``1000000``);
    None for ``none``."""
    if text.strip().lower() == "none":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 4G, 512M, or 'none')")
    size = int(float(match[1]) * _UNITS[match[2].upper()])
    if size < _FEWEST_BYTES:
        # (below it, OpenBLAS gives up allocating its buffers and aborts the process: "Memory allocation still failed")
        raise ValueError(f"{text!r} is less than 256M, too little for the libraries (numpy, onnxruntime, torch) to run")
    return size


_FEWEST_BYTES = 256 << 20


def free_memory() -> int | None:
    """The memory the machine can give a new allocation now (``MemAvailable`` plus ``SwapFree``), or None where
    /proc/meminfo does not tell."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return sum(int(fields[name].split()[0]) * 1024 for name in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


def format_size(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.0f} MiB"


@contextlib.contextmanager
def _data_limit(size: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    wanted = _allocated() + size  # (on top of what the process holds: in-process, a notebook's own arrays)
    if soft != resource.RLIM_INFINITY:
        wanted = min(wanted, soft)  # (never above a limit the process already has)
    elif wanted >= 1 << 62:  # (more than any machine has: no limit, which setrlimit could not take as a number)
        yield
        return
    resource.setrlimit(resource.RLIMIT_DATA, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _allocated() -> int:
    """The process's data size now (``VmData``), 0 where /proc does not tell."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class _Reached:
    """The SIGALRM handler of ``--timeout``: raises :class:`TimeLimitReached` naming the models the command reads."""

    def __init__(self, seconds: float, ctx: click.Context):
        self.seconds, self.ctx = seconds, ctx

    def __call__(self, signum, frame) -> None:
        ctx = self.ctx
        arguments = [ctx.params.get(param.name) for param in ctx.command.params if isinstance(param, click.Argument)]
        files = [str(value) for values in arguments for value in (values if isinstance(values, tuple) else (values,))
                 if isinstance(value, os.PathLike)]  # fmt: skip
        named = f"{', '.join(files)}: " if files else ""  # (none yet: the time ran out as the command line was read)
        raise TimeLimitReached(f"{named}stopped at the time limit of {self.seconds:g} s (--timeout)")


@contextlib.contextmanager
def _alarm(seconds: float, ctx: click.Context) -> Iterator[None]:
    reached = _Reached(seconds, ctx)
    previous = signal.signal(signal.SIGALRM, reached)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def work_done() -> None:
    """The command's work is done (its output written): what is left, printing the report, runs past ``--timeout``
    (a reader slow on the pipe must not turn a written output into an error)."""
    if hasattr(signal, "setitimer") and isinstance(signal.getsignal(signal.SIGALRM), _Reached):
        signal.setitimer(signal.ITIMER_REAL, 0)


# How numpy, torch and onnxruntime say an allocation failed (under the data limit: the limit was reached).
_ALLOCATION_FAILED = re.compile(r"MemoryError|can't allocate memory|Unable to allocate|Failed to allocate memory|bad_alloc|"
                                r"Cannot allocate memory|out of memory", re.IGNORECASE)  # fmt: skip


def allocation_failed(message: str) -> bool:
    """Whether an error's ``message`` says an allocation failed."""
    return _ALLOCATION_FAILED.search(message) is not None


def memory_hint(message: str) -> str:
    """``message``, with the memory limit in force named when it says an allocation failed."""
    ctx = click.get_current_context(silent=True)
    size = ctx.meta.get(_MAX_MEMORY) if ctx is not None else None
    if size is None or not allocation_failed(message):
        return message
    return f"{message} (the memory limit: {format_size(size)})"
