"""The ``bnfold`` command line: ``bnfold MODEL.onnx -o OUT.onnx`` (the ``fold`` command is the default).

Exit codes follow linters: 0 done, 1 verification failed (nothing written), 2 bad usage, bad input or an
internal error, 130 interrupted. Every error is one line on stderr, never a traceback. The heavy imports
(numpy, onnx, onnxruntime, torch) happen inside the commands, so ``--help`` is quick and an interrupt
during start-up is handled like any other.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import click

from bnfold.errors import (
    EXIT_BAD_INPUT,
    InputError,
    VerificationError,
    VerificationUnavailableError,
    describe_error,
    echo,
    echo_error,
    echo_error_json,
    fail,
    internal_error,
    stream_failed,
)
from bnfold.input_shapes import named, parse_input_shapes, positional
from bnfold.limits import TimeLimitReached, limit_options, work_done
from bnfold.verify_command import verification_options, verify

EXIT_VERIFICATION_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


# Commands imported only when run or listed (click's lazy subcommands): `bnfold MODEL -o OUT` does not pay
# for the check command's modules (15 ms).
_LAZY_COMMANDS = {"check": ("bnfold.check_command", "check")}


class _BnfoldGroup(click.Group):
    """Routes ``bnfold MODEL ...`` to ``bnfold fold MODEL ...``, suggests the command a mistyped word was
    meant to be, and turns usage errors, interrupts and unexpected exceptions into one line and an exit code."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **kwargs)
        # click's own writes (--help, --version, a command's --help) on a stdout that cannot take them; a closed pipe
        # click's main ends itself (exit 1).
        except OSError as error:
            stream_failed(error, sys.stdout)
            raise

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        json_errors = _asks_for_json(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.UsageError as error:  # (the group's own options and arguments)
            raise _usage_error_line(error, json_errors) from None
        ctx.meta[_JSON_ERRORS] = json_errors
        return ctx

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS and cmd_name not in self.commands:
            module, name = _LAZY_COMMANDS[cmd_name]
            self.add_command(getattr(importlib.import_module(module), name))
        return super().get_command(ctx, cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        commands = self.list_commands(ctx)
        if args and args[0] == "help":
            args = ["--help"]
        elif args and args[0] not in commands and args[0] not in _GROUP_OPTIONS:
            # (os.path.exists: False for a name the system cannot look up, which the command then reports)
            if not args[0].startswith("-") and not os.path.exists(args[0]):
                import difflib  # (only for what may be a mistyped command: 2 ms of start-up otherwise)

                close = difflib.get_close_matches(args[0], commands, n=1, cutoff=0.6)
                if close:
                    ctx.fail(f"no command {args[0]!r}; did you mean {close[0]!r}? (a model path runs `fold`)")
            # Options first: they are the command's that follows them (`bnfold --format json verify A B`), else fold's.
            named = next((index for index, arg in enumerate(args) if arg in commands and not os.path.exists(arg)), None)
            args = [args[named], *args[:named], *args[named + 1 :]] if args[0].startswith("-") and named else ["fold", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TimeLimitReached as error:
            _exit_now(str(error), EXIT_BAD_INPUT, ctx.meta[_JSON_ERRORS])
        except KeyboardInterrupt:
            _exit_now(None, EXIT_INTERRUPTED, json_errors=False)
        except click.UsageError as error:  # (a command's options and arguments)
            raise _usage_error_line(error, ctx.meta[_JSON_ERRORS]) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except MemoryError as error:  # (past --max-memory, in Python's or numpy's own allocations)
            fail(f"out of memory ({describe_error(error)})", output_format="json" if ctx.meta[_JSON_ERRORS] else "text")
        except Exception as error:  # a bug, not bad input; still one line, and not the code of a verdict
            if isinstance(error, OSError) and _raised_by_click_echo(error):  # (a command's --help on a stdout that cannot take it)
                raise  # (to main, which handles click's own writes)
            fail(internal_error(error), output_format="json" if ctx.meta[_JSON_ERRORS] else "text")


def _raised_by_click_echo(error: BaseException) -> bool:
    import traceback  # (3 ms of start-up otherwise)

    return any(frame.f_code is click.utils.echo.__code__ for frame, _ in traceback.walk_tb(error.__traceback__))


def _exit_now(message: str | None, code: int, json_errors: bool) -> NoReturn:
    """The end of an interrupted command (Ctrl-C, SIGTERM, ``--timeout``): its line, then out at once."""
    if message is None:
        click.echo("bnfold: interrupted", err=True)
    else:
        echo_error(message)
        if json_errors:
            echo_error_json(message, code)
    # Scratch files went as the stack unwound. After an onnxruntime run stopped mid-run, out at once: its session's
    # threads abort the interpreter's own exit (SIGABRT). Else as any exit (in-process, a notebook lives on).
    runtime = sys.modules.get("bnfold.onnx_fold.runtime")
    if runtime is not None and runtime.runs_stopped:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise click.exceptions.Exit(code)


# The group's own options: any other option first (`bnfold --no-verify MODEL -o OUT`) is the fold command's.
_GROUP_OPTIONS = ("-h", "--help", "--version")

# ctx.meta key: whether the command line asks for JSON (`--format json`), so that even a usage error's output is.
_JSON_ERRORS = "bnfold.json_errors"


def _asks_for_json(args: list[str]) -> bool:
    """Whether ``args`` hold ``--format json`` (or ``--format=json``) before a ``--``: click has not parsed them yet."""
    for index, arg in enumerate(args):
        if arg == "--":
            return False
        if arg == "--format=json" or (arg == "--format" and args[index + 1 : index + 2] == ["json"]):
            return True
    return False


def _usage_error_line(error: click.UsageError, json_errors: bool) -> click.exceptions.Exit:
    """Click's usage error as bnfold's one line (click prints three, with the usage), and the exit to raise;
    under ``--format json``, the error's JSON object on stdout too."""
    command = error.ctx.command_path if error.ctx is not None else "bnfold"
    message = f"{error.format_message()} (see '{command} --help')"
    echo_error(message)
    if json_errors:
        echo_error_json(message, EXIT_BAD_INPUT)
    return click.exceptions.Exit(EXIT_BAD_INPUT)


@click.group(cls=_BnfoldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Fold eval-mode BatchNorm into neighbouring layers; `bnfold MODEL -o OUT` runs `fold`."""
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so scratch files are removed on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # The libraries' warnings about a file (onnx's "experimental format", torch's pickle protocol, numpy's empty
    # means) say nothing a user can act on, and would make an error more than one line; -W or PYTHONWARNINGS
    # still turn them on.
    if not sys.warnoptions:
        warnings.simplefilter("ignore")


main.add_command(verify)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the folded model.")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL with the folded model.")
@click.option("--dry-run", is_flag=True, help="Fold and verify, report, write nothing.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime equivalence check.")
@verification_options
@limit_options
@click.option(
    "--freeze-initializer-inputs",
    is_flag=True,
    help="Treat graph inputs that have an initializer (every weight in IR version < 4 models) as constants and remove them from the inputs.",
)
@click.option("--quantization", is_flag=True,
              help="Measure what each fold does to int8 quantization of its layer (about 2x the fold's time on ResNet-50).")
@click.option("--target-dtype", type=click.Choice(["float16", "bfloat16"]),
              help="The dtype the model will be cast to: also report folded values that overflow it or fall below its normal range.")
def fold(
    model, output, in_place, dry_run, no_verify, output_format, input_shapes, atol, rtol, seed, freeze_initializer_inputs,
    quantization, target_dtype,
) -> None:
    """Fold every BatchNorm of MODEL that is safe to fold, verify, write OUTPUT, report."""
    from bnfold.onnx_fold.folding import fold_onnx_file
    from bnfold.onnx_fold.io import check_writable, data_input_names, save_model

    if in_place and output is not None:
        raise click.UsageError("give either -o/--output or --in-place, not both")
    if not (output or in_place or dry_run):
        raise click.UsageError("give -o/--output, --in-place or --dry-run")
    target = model if in_place else output
    read_from = [] if in_place else [model]  # --in-place replaces the input, and only then
    if target is not None and not in_place and target.absolute() == model.absolute():
        raise click.UsageError(f"{output} is the input model; pass --in-place to overwrite it")
    shapes = parse_input_shapes(input_shapes)
    try:
        if positional(shapes):
            shapes = named(shapes, data_input_names(model), str(model))
        if target is not None and not dry_run:
            check_writable(target, read_from)
        folded, report, pending = fold_onnx_file(
            model, verify=not no_verify, input_shapes=shapes, atol=atol, rtol=rtol, seed=seed,
            freeze_initializer_inputs=freeze_initializer_inputs, quantization=quantization, target_dtype=target_dtype,
        )  # fmt: skip
        if target is not None and not dry_run:
            save_model(folded, target, read_from=read_from, pending=pending)
            report.output = str(target)
        work_done()
    except InputError as error:
        fail(str(error), output_format=output_format)
    except VerificationUnavailableError as error:
        fail(f"{model}: {error}", output_format=output_format)
    except VerificationError as error:
        from bnfold.verification import CLI_OVERRIDES

        error.verification.overrides = CLI_OVERRIDES  # the reason names the flags, not the Python arguments
        work_done()
        _emit(error.report, output_format)
        fail(f"{model}: verification failed, nothing written: {error}", EXIT_VERIFICATION_FAILED)
    _emit(report, output_format)


def _emit(report, output_format: str) -> None:
    echo(report.to_json() if output_format == "json" else report.format_text())
