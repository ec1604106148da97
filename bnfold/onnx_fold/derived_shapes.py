"""Shapes that onnx's inference leaves unknown where the graph fixes them, for the fold analysis alone (the
working copy's inferred shapes are put back to the declared ones before the model is verified or written).

A MatMul fold needs the rank of the MatMul's data. TorchScript exports of LeViT (opset 11 to 13) compute
Reshape targets (``Concat`` of ``Unsqueeze(Gather(Shape(x)))``, or ``Shape(y)`` for ``reshape_as``), and onnx
infers no shape for such a Reshape's output even with data propagation, nor for the ops after it. The rank is
still fixed: a Reshape's output has as many axes as its target has entries (``Shape(y)`` has y's), an
elementwise op broadcasts its inputs' axes, a Transpose permutes them, a MatMul of ranks r, s >= 2 gives
max(r, s) axes, the last the weight's columns.
"""

from __future__ import annotations

import onnx_ir as ir

# Ops whose output has the shape their inputs broadcast to.
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Where", "PRelu"})
# Ops whose output has their first input's shape.
_SAME_SHAPE = frozenset(
    {"Identity", "Cast", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf", "Neg", "Abs",
     "Clip", "Softmax", "LogSoftmax", "Dropout", "BatchNormalization"}
)  # fmt: skip


def derive_missing_shapes(graph: ir.Graph) -> None:
    """Give each value of ``graph`` with no shape the dimensions its node fixes (None where unknown), in
    the graph's order, so that one derived shape serves the next node."""
    for node in graph:
        if node.domain not in ("", "ai.onnx") or not node.outputs or node.outputs[0].shape is not None:
            continue
        dims = _derived_dims(node)
        if dims is not None:
            node.outputs[0].shape = ir.Shape(dims)


def _derived_dims(node: ir.Node) -> list[int | None] | None:
    inputs = [static_dims(value) for value in node.inputs]
    if node.op_type == "Reshape":  # (whatever its data's shape)
        if len(inputs) != 2:
            return None
        shaped_like = _shape_of(node.inputs[1])
        if shaped_like is not None:  # (torch's reshape_as: the target is Shape(y))
            return [dim or None for dim in shaped_like]  # (a 0 in a target copies the data's size)
        target = inputs[1]
        return [None] * target[0] if target is not None and len(target) == 1 and target[0] is not None else None
    if not inputs or inputs[0] is None:
        return None
    data = inputs[0]
    if node.op_type in _SAME_SHAPE:
        return data
    if node.op_type in _BROADCAST:
        return None if None in inputs else _broadcast(inputs)
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        order = list(perm.value) if perm is not None and perm.type == ir.AttributeType.INTS else list(range(len(data)))[::-1]
        return [data[axis] for axis in order] if sorted(order) == list(range(len(data))) else None
    if node.op_type == "MatMul" and len(inputs) == 2 and inputs[1] is not None and min(len(data), len(inputs[1])) >= 2:
        weight = inputs[1]
        return [None] * (max(len(data), len(weight)) - 2) + [data[-2], weight[-1]]
    return None


def _shape_of(target: ir.Value) -> list[int | None] | None:
    """The dimensions whose sizes ``target`` holds when a Shape op of a value of known rank computes it."""
    shape_op = target.producer()
    if shape_op is None or shape_op.op_type != "Shape" or shape_op.domain not in ("", "ai.onnx"):
        return None
    dims = static_dims(shape_op.inputs[0])
    if dims is None:
        return None
    bounds = [shape_op.attributes.get(name) for name in ("start", "end")]
    if any(bound is not None and bound.type != ir.AttributeType.INT for bound in bounds):
        return None
    start, end = (None if bound is None else bound.value for bound in bounds)
    return dims[start:end]  # (the op's negative and out-of-range bounds are Python's slice bounds)


def _broadcast(shapes: list[list[int | None]]) -> list[int | None]:
    """numpy's broadcast of ``shapes``, axis by axis from the last (None where it depends on unknown sizes)."""
    rank = max(len(dims) for dims in shapes)
    result = []
    for axis in range(-rank, 0):
        sizes = [dims[axis] for dims in shapes if len(dims) >= -axis]
        known = set(sizes) - {1, None}  # (an unknown size is 1 or the known one, in a valid model)
        result.append(known.pop() if len(known) == 1 else (1 if not known and None not in sizes else None))
    return result


def static_dims(value: ir.Value | None) -> list[int | None] | None:
    """The value's dimensions (None where symbolic), or None when its rank is unknown."""
    if value is None or value.shape is None:
        return None
    return [dim if isinstance(dim, int) else None for dim in value.shape]
