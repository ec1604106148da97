"""``bnfold verify ORIGINAL.onnx CANDIDATE.onnx``: the fold's end-to-end verification on any two models with
the same interface (another tool's output, a hand-edited model, a re-export), with the same report.

Exit codes: 0 equivalent, 1 not, 2 bad input (a file that is not a usable model, or inputs that cannot be
made or run). The folds are those bnfold finds in ORIGINAL; each is checked on its own in CANDIDATE's layer of
the same name (else at the same position among the nodes of its op type), unless CANDIDATE keeps the
BatchNorm.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bnfold.errors import echo, fail
from bnfold.input_shapes import named, parse_input_shapes, positional
from bnfold.limits import limit_options, work_done

EXIT_NOT_EQUIVALENT = 1


def verification_options(command):
    """The options of every command that verifies (``fold``, ``verify``): one definition, one help text."""
    options = [
        click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]D1,D2,...",
                     help="Shape of an input, by name (NAME= or NAME:) or in input order; symbolic dims default to 1."),
        click.option("--atol", type=float, callback=_tolerance, help="Absolute tolerance (default by dtype: float32 1e-6)."),
        click.option("--rtol", type=float, callback=_tolerance,
                     help="Tolerance relative to each output's max |original| (default by dtype: float32 1e-3)."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random inputs."),
    ]  # fmt: skip
    for option in reversed(options):  # decorators apply bottom-up: keep the listed order in --help
        command = option(command)
    return command


def _tolerance(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    from bnfold.verification import tolerance  # (numpy: not for --help)

    try:
        return tolerance(param.name, value)
    except ValueError as error:
        raise click.BadParameter(str(error).partition(" ")[2], ctx, param) from None


@click.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@verification_options
@limit_options
def verify(original, candidate, output_format, input_shapes, atol, rtol, seed) -> None:
    """Run ORIGINAL and CANDIDATE on the same seeded random inputs and compare every output; check each fold
    bnfold finds in ORIGINAL against CANDIDATE's corresponding layer."""
    from bnfold.onnx_fold import fold_onnx
    from bnfold.onnx_fold.io import InputError, load_model
    from bnfold.onnx_fold.verify import VerificationUnavailableError
    from bnfold.onnx_fold.verify import verify as run_verification
    from bnfold.report import json_text, printable
    from bnfold.verification import CLI_OVERRIDES

    try:
        models = {path: load_model(path) for path in (original, candidate)}
        interfaces = {path: _interface(model) for path, model in models.items()}
        if interfaces[original] != interfaces[candidate]:
            raise InputError(str(candidate), f"its inputs and outputs {interfaces[candidate]} differ from {original}'s {interfaces[original]}")
        narrower = _narrower_input(models[original], models[candidate])
        if narrower:
            raise InputError(str(candidate), f"{narrower}, so it cannot stand in for {original}")
        shapes = parse_input_shapes(input_shapes)
        if positional(shapes):
            shapes = named(shapes, [name for name, _ in interfaces[original][0]], str(original))
        try:
            _, plan = fold_onnx(models[original], verify=False)  # which layers absorb which BatchNorms
        except InputError as error:  # (labelled with the graph's name: the model is in memory)
            raise InputError(str(original), error.problem) from None
        result = run_verification(  # (the original as loaded above: fold_onnx left it as it was)
            models[original], models[candidate], folds=plan.folds, input_shapes=shapes, atol=atol, rtol=rtol, seed=seed
        )
    except InputError as error:
        fail(str(error), output_format=output_format)
    except VerificationUnavailableError as error:
        fail(f"{candidate if error.model == 'folded' else original}: {error}", output_format=output_format)
    result.overrides = CLI_OVERRIDES
    work_done()
    if output_format == "json":
        # (/2: a figure that is not finite is the string "inf", "-inf" or "nan", as in the fold report; /3: noise_elements, noise_from)
        echo(json_text({"schema": "bnfold.verify-report/3", "original": str(original), "candidate": str(candidate),
                              "verification": result.to_dict()}))  # fmt: skip
    else:
        echo(printable(result.summary()))  # names from the models, escaped
        if result.reason:
            echo(f"  {printable(result.reason)}")
    sys.exit(0 if result.passed else EXIT_NOT_EQUIVALENT)


def _narrower_input(original, candidate) -> str | None:
    """Which of the candidate's data inputs takes fewer shapes than the original's (a size fixed where the
    original's is symbolic, or another size), said as a user reads it; None when each takes all the original's."""
    from bnfold.onnx_fold.derived_shapes import static_dims
    from bnfold.onnx_fold.io import data_inputs

    def shown(dims: list | None) -> list | str:
        return "no shape" if dims is None else ["?" if size is None else size for size in dims]

    for mine, theirs in zip(data_inputs(original.graph), data_inputs(candidate.graph), strict=True):
        wanted, offered = static_dims(mine), static_dims(theirs)
        if offered is None:
            continue
        if wanted is None or len(wanted) != len(offered) or any(size is not None and size != want for want, size in zip(wanted, offered)):
            return f"its input {theirs.name!r} has shape {shown(offered)} where the original's has {shown(wanted)}"
    return None


def _interface(model) -> tuple:
    """The names and element types of the model's data inputs and outputs."""
    from bnfold.onnx_fold.io import data_inputs

    inputs = [(v.name, str(v.dtype)) for v in data_inputs(model.graph)]
    return inputs, [(v.name, str(v.dtype)) for v in model.graph.outputs]

