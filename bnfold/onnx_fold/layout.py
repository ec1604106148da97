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
        allow_zero = _attribute(node, "allowzero", 0, ir.AttributeType.INT)
        result = []
        for position, size in enumerate(int(v) for v in target):
            if size == 0 and not allow_zero:
                result.append(dims[position] if position < rank else None)  # 0 copies the input's dimension
            else:
                result.append(size if size >= 0 else None)
        if None in result:  # one -1 (or a copied symbolic dimension): the rest of the elements
            known, total = _product([d for d in result if d is not None]), _product(dims)
            if result.count(None) == 1 and known and total is not None:
                result[result.index(None)] = total // known
        return result
    return static_dims(node.outputs[0])


def _product(dims: list[int | None]) -> int | None:
    return None if None in dims else math.prod(dims)
