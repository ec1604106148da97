"""Reading constant tensors out of an ONNX graph, and dropping the ones a fold leaves unread.

Exporters do not always hand weights over as plain initializers: the TorchScript exporter transposes a
Linear weight with a Transpose node, the dynamo exporter (unoptimised) builds a zero bias with
Shape/Expand/CastLike. :func:`constant_array` evaluates such side computations when every input is itself
constant (initializers, Constant nodes), using onnx's reference evaluator for ops other than the trivial
ones, without recursion (graphs can be thousands of nodes deep).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

# Cheap, shape-bounded ops that exporters put between an initializer and a layer's weight or bias input.
CONSTANT_OPS = frozenset(
    {
        "Constant", "Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast",
        "CastLike", "Shape", "Expand", "ConstantOfShape", "Concat", "Gather", "Slice", "Neg",
        "Mul", "Add", "Sub", "Div",
    }
)  # fmt: skip


# Marks a value found to be computed at run time, holding the reason. Folding only ever replaces constants
# with constants, so the mark stays true; it keeps repeated queries along long Add/Mul chains linear
# instead of quadratic.
_NOT_CONSTANT = "bnfold.not_constant"


class MalformedTensorError(ValueError):
    """A stored tensor whose data does not fit its type and shape (short raw data, the wrong typed field, an
    undefined type): the model cannot be used at all."""


def _initializer_array(value: ir.Value) -> np.ndarray | None:
    tensor = value.const_value
    if tensor is None:
        return None
    try:
        array = tensor.numpy()
    except Exception as error:  # onnx_ir raises ValueError, TypeError, ... depending on how the data is wrong
        raise MalformedTensorError(f"tensor {value.name!r} is unreadable ({type(error).__name__}: {error})") from None
    if isinstance(tensor, ir.ExternalTensor):
        # Copy out and unmap, so a large model's weights are not all held mapped at once.
        array = array.copy()
        tensor.release()
    return array


def _is_constant_op(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in CONSTANT_OPS


def _static_shape(value: ir.Value) -> list[int] | None:
    if value.shape is None or not all(isinstance(dim, int) for dim in value.shape):
        return None
    return list(value.shape)


def _needed_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs whose contents the node's result depends on (CastLike reads only its target's
    type, Shape only a static shape)."""
    if node.op_type == "CastLike" and node.inputs[1].dtype is not None:
        return [node.inputs[0]]
    if node.op_type == "Shape" and not node.attributes and _static_shape(node.inputs[0]) is not None:
        return []
    return [value for value in node.inputs if value is not None]


def _evaluate(node: ir.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
    if node.op_type == "CastLike" and node.inputs[1].dtype is not None:
        return [inputs[0].astype(node.inputs[1].dtype.numpy())]
    if node.op_type == "Shape" and inputs[0] is None:
        return [np.array(_static_shape(node.inputs[0]), dtype=np.int64)]
    if node.op_type == "Constant":
        return [ir.convenience.get_const_tensor(node.outputs[0]).numpy()]
    if node.op_type == "Identity":
        return [inputs[0]]
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        return [np.transpose(inputs[0], None if perm is None else list(perm.as_ints()))]
    proto = ir.serde.serialize_node(node)
    names = [f"in{i}" if array is not None else "" for i, array in enumerate(inputs)]
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    del proto.input[:], proto.output[:]
    proto.input.extend(names)
    proto.output.extend(outputs)
    graph = onnx.helper.make_graph(
        [proto], "constant", [onnx.helper.make_tensor_value_info(n, 0, None) for n in names if n],
        [onnx.helper.make_tensor_value_info(n, 0, None) for n in outputs],
    )  # fmt: skip
    opset = node.version or (node.graph.opset_imports.get("") if node.graph is not None else None)
    evaluator = ReferenceEvaluator(graph, opsets={"": opset or onnx.defs.onnx_opset_version()})
    feeds = {name: array for name, array in zip(names, inputs) if name}
    return [np.asarray(result) for result in evaluator.run(None, feeds)]


FREEZE_HINT = (
    "pass freeze_initializer_inputs=True (CLI: --freeze-initializer-inputs) to fold it as a constant, "
    "which removes such inputs from the model's interface"
)


def _input_reason(value: ir.Value) -> str:
    if value.const_value is None:
        return f"read from graph input {value.name!r}; make it an initializer to fold"
    # IR version < 4 requires every initializer to be a graph input: the usual source of this.
    return (
        f"read from graph input {value.name!r}, whose initializer is only an overridable default (IR version < 4 "
        f"models declare every initializer an input); {FREEZE_HINT}"
    )


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's content when it is computable without running the model: an initializer that is not
    also a graph input (those are overridable defaults), a Constant node, or :data:`CONSTANT_OPS` over
    those. None otherwise (:func:`not_constant_reason` says why)."""
    return None if value is None else _constant(value)[0]


def not_constant_reason(value: ir.Value) -> str:
    """Why :func:`constant_array` of ``value`` is None, as a phrase ("read from graph input 'x'")."""
    return _constant(value)[1]


def _constant(value: ir.Value) -> tuple[np.ndarray | None, str]:
    known: dict[ir.Value, np.ndarray | None] = {}
    reasons: dict[ir.Value, str] = {}
    stack = [value]
    while stack:
        current = stack[-1]
        if current in known:
            stack.pop()
            continue
        producer = current.producer()
        marked = current.meta.get(_NOT_CONSTANT)
        if marked or current.is_graph_input() or (producer is not None and not _is_constant_op(producer)):
            known[current] = None
            if marked:
                reasons[current] = marked
            elif current.is_graph_input():
                reasons[current] = _input_reason(current)
            else:
                reasons[current] = f"computed at run time (by {producer.op_type})"
            stack.pop()
            continue
        if producer is None:
            known[current] = _initializer_array(current)
            reasons[current] = "neither an initializer nor computed from constants"
            stack.pop()
            continue
        needed = _needed_inputs(producer)
        blocked = next((v for v in needed if v in known and known[v] is None), None)
        pending = next((v for v in needed if v not in known), None)
        if blocked is None and pending is not None:
            stack.append(pending)  # one at a time: an input found not constant ends the search here
            continue
        stack.pop()
        if blocked is not None:
            results, reason = [None] * len(producer.outputs), reasons[blocked]
        else:
            inputs = [known[v] if v in needed else None for v in producer.inputs]
            try:
                results, reason = _evaluate(producer, inputs), ""
            except Exception as error:  # an op the reference evaluator rejects: treat as not constant
                results = [None] * len(producer.outputs)
                reason = f"computed by a {producer.op_type} that could not be evaluated ({type(error).__name__})"
        known.update(zip(producer.outputs, results))
        for output, result in zip(producer.outputs, results):
            if result is None:
                output.meta[_NOT_CONSTANT] = reasons[output] = reason
    return known[value], reasons.get(value, "")


def drop_if_unread(value: ir.Value | None) -> None:
    """Remove ``value`` and the constant computation behind it once nothing reads any of it."""
    pending = [value]
    while pending:
        current = pending.pop()
        if current is None or current.uses() or current.is_graph_output() or current.is_graph_input():
            continue
        producer = current.producer()
        if producer is None:
            graph = current.graph
            if graph is not None and current.name in graph.initializers:
                del graph.initializers[current.name]
            continue
        if not _is_constant_op(producer) or producer.graph is None:
            continue
        if any(out.uses() or out.is_graph_output() for out in producer.outputs):
            continue
        inputs = list(producer.inputs)  # removal detaches them
        producer.graph.remove(producer, safe=True)
        pending.extend(inputs)
