"""``bnfold verify ORIGINAL.onnx CANDIDATE.onnx``: the fold's end-to-end verification on any two models with
the same interface (another tool's output, a hand-edited model, a re-export), with the same report.

Exit codes: 0 equivalent, 1 not, 2 bad input (a file that is not a usable model, or inputs that cannot be
made or run). Per-fold checks need to know which layers were folded, so only the outputs are compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bnfold.input_shapes import named, parse_input_shapes, positional

EXIT_NOT_EQUIVALENT = 1
EXIT_BAD_INPUT = 2


@click.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]D1,D2,...",
              help="Shape of an input, by name (NAME= or NAME:) or in input order; symbolic dims default to 1.")
@click.option("--atol", type=float, help="Absolute tolerance (default by dtype: float32 1e-6).")
@click.option("--rtol", type=float, help="Tolerance relative to each output's max |original| (default by dtype: float32 1e-3).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random inputs.")
def verify(original, candidate, output_format, input_shapes, atol, rtol, seed) -> None:
    """Run ORIGINAL and CANDIDATE on the same seeded random inputs and compare every output."""
    from bnfold.onnx_io import InputError, data_input_names, load_model
    from bnfold.onnx_verify import VerificationUnavailableError
    from bnfold.onnx_verify import verify as run_verification
    from bnfold.report import printable

    try:
        models = {path: load_model(path) for path in (original, candidate)}
        interfaces = {path: _interface(model) for path, model in models.items()}
        if interfaces[original] != interfaces[candidate]:
            raise InputError(str(candidate), f"its inputs and outputs {interfaces[candidate]} differ from {original}'s {interfaces[original]}")
        shapes = parse_input_shapes(input_shapes)
        if positional(shapes):
            shapes = named(shapes, data_input_names(original), str(original))
        result = run_verification(str(original), models[candidate], input_shapes=shapes, atol=atol, rtol=rtol, seed=seed)
    except InputError as error:
        _fail(str(error))
    except VerificationUnavailableError as error:
        _fail(f"{original}: {error}")
    if output_format == "json":
        click.echo(json.dumps({"schema": "bnfold.verify-report/1", "original": str(original), "candidate": str(candidate),
                               "verification": result.to_dict()}, indent=2))  # fmt: skip
    else:
        click.echo(printable(result.summary()))  # names from the models, escaped
        if result.reason:
            click.echo(f"  {printable(result.reason)}")
    sys.exit(0 if result.passed else EXIT_NOT_EQUIVALENT)


def _interface(model) -> tuple:
    """The names and element types of the model's data inputs and outputs."""
    initializers = set(model.graph.initializers)
    inputs = [(v.name, str(v.dtype)) for v in model.graph.inputs if v.name not in initializers]
    return inputs, [(v.name, str(v.dtype)) for v in model.graph.outputs]


def _fail(message: str) -> None:
    click.echo(f"bnfold: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)
