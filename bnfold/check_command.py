"""The ``bnfold check`` command: check model files for eval-mode mistakes, linter style.

Exit codes: 0 no error finding (warnings and info pass), 1 error findings, 2 bad usage or an input
that could not be checked (its problem goes to stderr; the other inputs are still checked).
The codes are listed in :mod:`bnfold.checks`; the output formats in :mod:`bnfold.checks.output`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click

from bnfold.checks import CODES, CodeSelection, Finding, UnknownCodeError, errors
from bnfold.checks.findings import DEFAULT_BATCH_SIZE
from bnfold.checks.output import FORMATTERS, CheckResults
from bnfold.errors import EXIT_BAD_INPUT, InputError, describe_error, echo, echo_error, internal_error
from bnfold.input_shapes import parse_input_shapes, positional
from bnfold.limits import limit_options, work_done
from bnfold.report import printable

EXIT_ERROR_FINDINGS = 1


def _codes_epilog() -> str:
    rows = "\n".join(f"  {rule.code}  {rule.severity:<8} {rule.title}" for rule in CODES.values())
    return f"\b\nFinding codes:\n{rows}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_codes_epilog())
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="[PATH]...")
@click.option("--model", "model_specs", multiple=True, metavar="MODULE:CALLABLE",
              help="Check the model this callable returns (repeatable).")
@click.option("--factory", metavar="MODULE:CALLABLE", help="Builds the architecture that state-dict files are loaded into; a state-dict stores no train/eval mode, so "
                   "it is checked in eval mode, as deployed.")
@click.option("--trust-pickle", is_flag=True,
              help="Load pickled modules (torch.save(model)), TorchScript archives, and .pt2 archives holding pickled "
                   "objects, compiled code or file operations; this runs code from the file.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]D1,D2,...",
              help="Input shape, batch dimension first, for the batch-dependence measurement: by name (NAME= or NAME:) "
                   "for ONNX inputs, or in input order (float32 for PyTorch models). --batch-size sets the batch dimension.")
@click.option("--batch-size", type=click.IntRange(min=2), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Samples in the batch that is compared with each sample alone.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random samples.")
@click.option("--select", metavar="CODES",
              help="Report only these codes or code prefixes, comma-separated (e.g. BN,DO001).")
@click.option("--ignore", metavar="CODES", help="Do not report these codes or code prefixes, comma-separated.")
@click.option("--format", "output_format", type=click.Choice(list(FORMATTERS)), default="text", show_default=True)
@limit_options
def check(paths, model_specs, factory, trust_pickle, input_shapes, batch_size, seed, select, ignore, output_format) -> None:
    """Check ONNX files and PyTorch models for BatchNorm/Dropout left in training mode, untrained or
    broken statistics, and outputs that change with the batch; exit 1 on any error finding.

    A directory PATH is searched for .onnx and .pt2 files (inside a git work tree, those git does not ignore)."""
    if not paths and not model_specs:
        raise click.UsageError("give model files (PATH...) or --model MODULE:CALLABLE")
    try:
        selection = CodeSelection.parse(select, ignore)
    except UnknownCodeError as error:
        raise click.BadParameter(str(error), param_hint="--select/--ignore") from None
    shapes = parse_input_shapes(input_shapes)
    from bnfold.checks import sources  # imports numpy and onnx: only when something is checked

    example_inputs = sources.example_inputs(positional(shapes))
    measurement = {"batch_size": batch_size, "seed": seed, "measure_batch": selection.reports_any("BD")}
    results = CheckResults()
    files = []
    for given in paths:
        found = sources.files_to_check(given)
        if not found:  # (a directory: a CI gate pointed at the wrong folder would otherwise pass in silence)
            click.echo(f"bnfold: warning: {printable(str(given))}: no model files ({', '.join(sources.MODEL_SUFFIXES)}) to check", err=True)
        files += found
    for path in files:
        check_path = functools.partial(
            sources.check_file, path, factory=factory, trust_pickle=trust_pickle, input_shapes=shapes,
            example_inputs=example_inputs, **measurement,
        )  # fmt: skip
        _check_one(results, selection, str(path), check_path)
    for spec in model_specs:
        check_spec = functools.partial(sources.check_entry_point, spec, example_inputs, **measurement)
        _check_one(results, selection, spec, check_spec)
    work_done()
    text = FORMATTERS[output_format](results)
    if text:
        echo(text)
    click.get_current_context().exit(_exit_code(results))


def _check_one(results: CheckResults, selection: CodeSelection, label: str, run: Callable[[], list[Finding]]) -> None:
    try:
        findings = run()
    except InputError as error:
        echo_error(str(error))
        results.unreadable[label] = error.problem
        return
    except Exception as error:  # noqa: BLE001 - a bug, not bad input: reported for this model, the others still checked
        problem = f"out of memory ({describe_error(error)})" if isinstance(error, MemoryError) else internal_error(error)
        echo_error(f"{label}: {problem}")
        results.unreadable[label] = problem
        return
    results.findings += selection.apply(findings)
    results.checked += 1


def _exit_code(results: CheckResults) -> int:
    if results.unreadable:
        return EXIT_BAD_INPUT
    return EXIT_ERROR_FINDINGS if errors(results.findings) else 0
