"""Layout ops between a layer and its BatchNorm: whether they keep the layer's output features on the
BatchNorm's channel axis.

LeViT's ``LinearNorm`` (timm) runs a Linear on ``[B, N, K]`` tokens and normalises its ``C`` output
features with a BatchNorm1d over ``x.flatten(0, 1)``: ``MatMul -> Flatten/Reshape to [B*N, C] ->
BatchNormalization -> Reshape back``. The BatchNorm's channel axis (1) holds the MatMul's features (its last
axis) exactly when the layout op keeps that axis whole: a row-major reshape of ``[..., C]`` to ``[M, C]``
does (element ``(m, c)`` is feature ``c``), one to ``[M, 2C]`` or ``[M*2, C/2]`` mixes features with other
axes. :func:`features_on_channel_axis` proves it from the op's attributes, its constant target shape, or
the inferred shapes, and otherwise says why not.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from bnfold.onnx_fold.constants import constant_array
from bnfold.onnx_fold.derived_shapes import static_dims

# Ops that only move a tensor's elements: a BatchNorm behind one folds when it keeps the features whole.
LAYOUT_OPS = ("Flatten", "Reshape", "Transpose")


class _Malformed(Exception):
    """An attribute or target shape of a type the op does not take (a malformed model): why."""


def _attribute(node: ir.Node, name: str, default, kind: ir.AttributeType):
    attribute = node.attributes.get(name)
    if attribute is None:
        return default
    if attribute.type != kind:
        raise _Malformed(f"the {name} attribute of {node.op_type} is {attribute.type.name}, not {kind.name}")
    return attribute.value


def features_on_channel_axis(node: ir.Node, features: int, layer_label: str) -> str | None:
    """None when layout op ``node`` puts the ``features`` entries of its input's last axis (the output
    features of ``layer_label``), and only them, on axis 1 of its output; otherwise why it does not, or why
    that cannot be proven."""
    try:
        return _features_on_channel_axis(node, features, layer_label)
    except _Malformed as why:
        return str(why)


def _features_on_channel_axis(node: ir.Node, features: int, layer_label: str) -> str | None:
    dims = static_dims(node.inputs[0])
    if dims is None:
        return f"the rank of {layer_label}'s output, which {node.op_type} reshapes, is unknown (shape inference found none)"
    rank = len(dims)
    if node.op_type == "Transpose":
        perm = _attribute(node, "perm", None, ir.AttributeType.INTS)
        source = list(perm)[1] if perm is not None and len(perm) > 1 else rank - 2  # default: reversed axes
        if source == rank - 1:
            return None
        return f"{node.op_type} moves axis {source} of {layer_label}'s output to the BatchNorm's channel axis, not its feature axis {rank - 1}"
    output_dims = _output_dims(node, dims)
    if output_dims is None:
        return f"the shape {node.op_type} gives {layer_label}'s output is unknown (no constant target shape, no inferred shape)"
    if len(output_dims) != 2:
        return f"{node.op_type} gives {layer_label}'s output a {len(output_dims)}-D shape; only a reshape to [-1, {features}] keeps its features on the channel axis"
    if output_dims[1] == features:
        return None
    size = "an unknown number of" if output_dims[1] is None else f"{output_dims[1]}"
    return (
        f"{node.op_type} puts {size} values on the BatchNorm's channel axis, not the {features} output features of "
        f"{layer_label} alone (it mixes them with other axes); only a reshape to [-1, {features}] keeps them whole"
    )


def _output_dims(node: ir.Node, dims: list[int | None]) -> list[int | None] | None:
    """The layout op's output dimensions (None where unknown), from its attributes or constant target shape,
    else from shape inference; None when not even the rank is known."""
    rank = len(dims)
    if node.op_type == "Flatten":
        axis = _attribute(node, "axis", 1, ir.AttributeType.INT)
        if not -rank <= axis <= rank:
            raise _Malformed(f"Flatten's axis {axis} is out of range for its {rank}-D input")
        axis = axis + rank if axis < 0 else axis
        inner = dims[axis:]
        return [_product(dims[:axis]), _product(inner)]
    target = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is not None and target.dtype != np.int64:
        raise _Malformed(f"the target shape of {node.op_type} is {target.dtype}, not int64")
    if target is not None and target.ndim == 1:
        sizes = [int(v) for v in target]
    else:
        sizes = _concatenated_sizes(node.inputs[1], node.inputs[0]) if len(node.inputs) > 1 else None
    if sizes is not None:
        allow_zero = _attribute(node, "allowzero", 0, ir.AttributeType.INT)
        result, copied = [], set()  # (copied: the input's axes whose size an output axis takes, known or not)
        for position, size in enumerate(sizes):
            if isinstance(size, _InputAxis) or (size == 0 and not allow_zero):
                axis = size.axis if isinstance(size, _InputAxis) else position  # (a 0 copies the input's dimension)
                copied.add(axis)
                result.append(dims[axis] if axis < rank else None)
            else:
                result.append(size if size is not None and size >= 0 else None)
        open_sizes = [position for position, size in enumerate(sizes) if not isinstance(size, _InputAxis) and (size is None or size < 0)]
        if len(open_sizes) == 1:  # one -1: the rest of the elements (a copied size cancels, symbolic or not)
            known = _product([d for position, d in enumerate(result) if position != open_sizes[0] and not isinstance(sizes[position], _InputAxis) and sizes[position] != 0])
            rest = _product([d for axis, d in enumerate(dims) if axis not in copied])
            if known and rest is not None and rest % known == 0:
                result[open_sizes[0]] = rest // known
        inferred = static_dims(node.outputs[0])  # (what shape inference knows of the sizes left open)
        if inferred is not None and len(inferred) == len(result):
            result = [size if size is not None else other for size, other in zip(result, inferred)]
        return result
    return static_dims(node.outputs[0])


@dataclasses.dataclass(frozen=True)
class _InputAxis:
    """A size of a computed target shape that is the size of the reshaped input's axis ``axis``."""

    axis: int


def _concatenated_sizes(value: ir.Value | None, data: ir.Value) -> list[int | None | _InputAxis] | None:
    """A target shape computed at run time as a Concat of 1-D pieces (possibly through a Cast), e.g. tf2onnx's
    ``Concat(Gather(Shape(x), [0, 1]), [C])`` or Paddle's ``Concat(Slice(Shape(x), 0, 1), [-1])``: each size, an
    :class:`_InputAxis` where a piece copies sizes of ``data`` (the reshaped input), None where a piece is not
    constant; None when that is not its form."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Cast":
        producer = producer.inputs[0].producer() if producer.inputs and producer.inputs[0] is not None else None
    if producer is None or producer.op_type != "Concat" or producer.domain not in ("", "ai.onnx"):
        return None
    sizes: list[int | None] = []
    for piece in producer.inputs:
        if piece is None:
            return None
        constant = constant_array(piece)
        if constant is not None and constant.ndim == 1 and constant.dtype.kind in "iu":
            sizes += [int(size) for size in constant]
            continue
        axes = _input_axes(piece, data)
        if axes is not None:
            sizes += [_InputAxis(axis) for axis in axes]
            continue
        dims = static_dims(piece)
        if dims is None or len(dims) != 1 or dims[0] is None:
            return None
        sizes += [None] * dims[0]
    return sizes


def _input_axes(piece: ir.Value, data: ir.Value) -> list[int] | None:
    """The axes of ``data`` whose sizes ``piece`` is: ``Gather(Shape(data), constant indices)`` or
    ``Slice(Shape(data), constant starts, constant ends)`` (step 1, axis 0); None otherwise."""
    producer = piece.producer()
    shape = producer.inputs[0].producer() if producer is not None and producer.inputs and producer.inputs[0] is not None else None
    rank = None if data.shape is None else len(data.shape)
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not data or shape.attributes or rank is None:
        return None
    constants = [constant_array(value) if value is not None else None for value in producer.inputs[1:]]
    if any(constant is None or constant.dtype.kind not in "iu" for constant in constants):
        return None
    if producer.op_type == "Gather" and producer.attributes.get_int("axis", 0) == 0 and constants[0].ndim == 1:
        return [int(index) % rank for index in constants[0]]
    if producer.op_type == "Slice" and len(constants) >= 2 and all(constant.size == 1 for constant in constants):
        start, end, axis, step = (int(constant.reshape(-1)[0]) for constant in (*constants, *[np.zeros(1), np.ones(1)][len(constants) - 2 :]))
        return list(range(rank))[slice(start, end)] if axis == 0 and step == 1 else None
    return None


def _product(dims: list[int | None]) -> int | None:
    return None if None in dims else math.prod(dims)


def moved_channel_axis(node: ir.Node, axis: int, rank: int, channels: int) -> tuple[int, int] | str:
    """Where ``node`` (one of ``CHANNEL_MOVING_OPS``) puts axis ``axis`` of its ``rank``-D input, which holds
    ``channels`` channels: (its axis in the output, the output's rank), or why it does not keep them whole on one."""
    try:
        return _moved_channel_axis(node, axis, rank, channels)
    except _Malformed as why:
        return str(why)


def _moved_channel_axis(node: ir.Node, axis: int, rank: int, channels: int) -> tuple[int, int] | str:
    op = node.op_type
    if op == "Transpose":
        perm = _attribute(node, "perm", None, ir.AttributeType.INTS)
        perm = list(range(rank))[::-1] if perm is None else list(perm)
        if sorted(perm) != list(range(rank)):
            return f"Transpose's perm {perm} is not a permutation of its input's {rank} axes"
        return perm.index(axis), rank
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(node)
        if axes is None:
            return f"the axes {op} takes are not constant"
        counted = rank if op == "Squeeze" else rank + len(axes)  # (Unsqueeze's axes count its output's)
        if not all(-counted <= a < counted for a in axes) or len({a % counted for a in axes}) != len(axes):
            return f"{op}'s axes {axes} are out of range or repeated"
        axes = {a % counted for a in axes}
        if op == "Squeeze":
            return "Squeeze removes the channel axis" if axis in axes else (axis - sum(a < axis for a in axes), rank - len(axes))
        return [position for position in range(counted) if position not in axes][axis], counted
    dims = static_dims(node.inputs[0])
    output_dims = None if dims is None else _output_dims(node, dims)
    if dims is None or output_dims is None or len(dims) != rank:
        return f"the shape {op} gives is unknown"
    # Row-major: the channels stay whole on an axis of theirs (size, and the product of the axes after it) alone.
    after = _product(dims[axis + 1 :])
    for position, size in enumerate(output_dims):
        if size == channels and after is not None and _product(output_dims[position + 1 :]) == after:
            return position, len(output_dims)
    return f"{op} spreads the {channels} channels over other axes"


def _axes(node: ir.Node) -> list[int] | None:
    """Squeeze's or Unsqueeze's axes: an attribute before opset 13, a constant input since; None when unknown."""
    attribute = node.attributes.get("axes")
    if attribute is not None:
        return list(_attribute(node, "axes", None, ir.AttributeType.INTS))
    value = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return None if value is None or value.dtype.kind not in "iu" else [int(a) for a in value.reshape(-1)]
