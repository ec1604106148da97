"""``--input-shape`` for every command: one syntax, one validation.

``NAME=D1,D2,...`` or ``NAME:D1,D2,...`` (onnxsim's and polygraphy's spelling) names an input; bare
``D1,D2,...`` gives the inputs in order (the model's data inputs for ONNX, the forward's arguments for
PyTorch). Every size is a positive integer.
"""

from __future__ import annotations

import click

_LARGEST_SIZE = 2**63 - 1
# Names first, in the order given; positional shapes after, as {0: dims, 1: dims, ...}.
InputShapes = dict[str | int, list[int]]


def parse_input_shapes(specs: tuple[str, ...]) -> InputShapes:
    """The shapes of repeated ``--input-shape`` options; :class:`click.BadParameter` for a malformed one."""
    shapes: InputShapes = {}
    position = 0
    for spec in specs:
        name, separator, dims = spec.rpartition("=")
        if not separator:
            name, _, dims = spec.rpartition(":")
        try:
            shape = [int(dim) for dim in dims.split(",")]
        except ValueError:
            shape = []
        if not shape or any(dim < 1 for dim in shape):
            message = f"{spec!r} is not [NAME=]D1,D2,... (or NAME:D1,D2,...) with positive sizes"
            raise click.BadParameter(message, param_hint="--input-shape")
        if any(dim > _LARGEST_SIZE for dim in shape):  # (numpy and torch take sizes as 64-bit integers)
            raise click.BadParameter(f"{spec!r} has a size past {_LARGEST_SIZE}", param_hint="--input-shape")
        if name:
            shapes[name] = shape
        else:
            shapes[position] = shape
            position += 1
    return shapes


def named(shapes: InputShapes, input_names: list[str], label: str) -> dict[str, list[int]]:
    """``shapes`` with positional entries given the names of ``input_names`` in order."""
    from bnfold.errors import InputError

    positional = [dims for key, dims in shapes.items() if isinstance(key, int)]
    if len(positional) > len(input_names):
        raise InputError(label, f"{len(positional)} input shapes given in order, but the model has {len(input_names)} input(s)")
    resolved = {key: dims for key, dims in shapes.items() if isinstance(key, str)}
    for name, dims in zip(input_names, positional):
        if name in resolved:
            raise InputError(label, f"input {name!r} is given a shape both by name and in order")
        resolved[name] = dims
    return resolved


def positional(shapes: InputShapes) -> list[list[int]]:
    """The shapes given in order (PyTorch models take positional example inputs)."""
    return [dims for key, dims in shapes.items() if isinstance(key, int)]
