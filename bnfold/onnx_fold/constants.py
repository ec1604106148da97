"""Reading constant tensors out of an ONNX graph, and dropping the ones a fold leaves unread.

Weights are not always plain initializers: the TorchScript exporter transposes a Linear weight with a
Transpose node, the dynamo exporter (unoptimised) builds a zero bias with Shape/Expand/CastLike, converted
model-zoo networks build theirs with ConstantOfShape, Range, Mul, Concat, ... :func:`constant_array`
evaluates any such computation whose inputs are all constant (initializers, Constant nodes), a node at a
time (onnx's reference evaluator on a one-node model, for ops other than the trivial ones), without
recursion (graphs can be thousands of nodes deep), and refuses a result past :data:`EVALUATION_CAP_BYTES`.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from bnfold.onnx_fold.shared import MalformedTensorError, evaluable_op

# A computed tensor may take this much, or as much as the node's inputs together (a Transpose or Reshape
# of a large stored weight creates nothing new); past it the value is left as not constant.
EVALUATION_CAP_BYTES = 64 << 20

# Inputs at most this large are handed to shape inference as data: shapes, repeats, Range's bounds.
_SHAPE_DATA_ELEMENTS = 64


# Marks a value found to be computed at run time, holding the reason. Folding only ever replaces constants
# with constants, so the mark stays true; it keeps repeated queries along long Add/Mul chains linear
# instead of quadratic.
_NOT_CONSTANT = "bnfold.not_constant"


def _initializer_array(value: ir.Value) -> np.ndarray | None:
    tensor = value.const_value
    if tensor is None:
        return None
    try:
        array = tensor.numpy()
    except Exception as error:  # onnx_ir raises ValueError, TypeError, ... depending on how the data is wrong
        raise MalformedTensorError.unreadable(value.name, error) from None
    if isinstance(tensor, ir.ExternalTensor):
        # Copy out and unmap, so a large model's weights are not all held mapped at once; unless another reader
        # holds a view of the map (verification's arrays for onnxruntime): it goes when they let go of it.
        array = array.copy()
        with contextlib.suppress(BufferError):
            tensor.release()
    return array


def _is_constant_op(node: ir.Node) -> bool:
    return evaluable_op(node.domain, node.op_type)


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
    proto, names, outputs, opset = _one_node(node, inputs)
    predicted = _predicted_bytes(node, proto, names, inputs, opset)
    limit = _byte_limit(inputs)
    if predicted is not None and predicted > limit:
        raise _TooLarge(predicted, limit)
    graph = onnx.helper.make_graph(
        [proto], "constant", [onnx.helper.make_tensor_value_info(n, 0, None) for n in names if n],
        [onnx.helper.make_tensor_value_info(n, 0, None) for n in outputs],
    )  # fmt: skip
    evaluator = ReferenceEvaluator(graph, opsets={"": opset})
    feeds = {name: array for name, array in zip(names, inputs) if name}
    results = [np.asarray(result) for result in evaluator.run(None, feeds)]
    produced = sum(result.nbytes for result in results)
    if produced > limit:  # shape inference could not bound it beforehand
        raise _TooLarge(produced, limit)
    return results


class _TooLarge(Exception):
    def __init__(self, size: int, limit: int):
        super().__init__(f"{size / 2**20:.1f} MiB, past the {limit / 2**20:.0f} MiB cap on evaluated tensors")


def _byte_limit(inputs: list[np.ndarray | None]) -> int:
    return max(EVALUATION_CAP_BYTES, sum(array.nbytes for array in inputs if array is not None))


def _one_node(node: ir.Node, inputs: list[np.ndarray | None]):
    """The node as a NodeProto reading ``in<i>`` (the present inputs) and writing ``out<i>``, and its opset."""
    proto = ir.serde.serialize_node(node)
    names = [f"in{i}" if array is not None else "" for i, array in enumerate(inputs)]
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    del proto.input[:], proto.output[:]
    proto.input.extend(names)
    proto.output.extend(outputs)
    opset = node.version or (node.graph.opset_imports.get("") if node.graph is not None else None)
    return proto, names, outputs, opset or onnx.defs.onnx_opset_version()


def _predicted_bytes(node, proto, names, inputs, opset: int) -> int | None:
    """The outputs' size by shape inference, before anything is allocated (ConstantOfShape, Expand, Tile
    and Range can ask for any size); None when inference cannot tell."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
        types, data = {}, {}
        for name, array in zip(names, inputs):
            if name:
                element = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
                types[name] = onnx.helper.make_tensor_type_proto(element, array.shape)
                if array.size <= _SHAPE_DATA_ELEMENTS:
                    data[name] = numpy_helper.from_array(array, name)
        opsets = [onnx.helper.make_opsetid("", opset)]
        inferred = onnx.shape_inference.infer_node_outputs(schema, proto, types, data, opset_imports=opsets)
    except Exception:  # an op or input type inference does not cover: the size is checked afterwards
        return None
    total = 0
    for value_type in inferred.values():
        tensor = value_type.tensor_type
        if not tensor.HasField("shape") or not all(dim.HasField("dim_value") for dim in tensor.shape.dim):
            return None
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
        total += math.prod(dim.dim_value for dim in tensor.shape.dim) * itemsize
    return total


FREEZE_HINT = (
    "pass freeze_initializer_inputs=True (CLI: --freeze-initializer-inputs) to fold it as a constant, "
    "which removes such inputs from the model's interface"
)


def _input_reason(value: ir.Value) -> str:
    if value.const_value is None:
        return f"read from graph input {value.name!r}; make it an initializer to fold"
    # IR version < 4 requires every initializer to be a graph input, and torch.onnx.export's
    # keep_initializers_as_inputs=True writes them so: the usual sources of this.
    return (
        f"read from graph input {value.name!r}, whose initializer is only an overridable default (IR version < 4 "
        f"models, and exports with keep_initializers_as_inputs=True, declare every initializer an input); {FREEZE_HINT}"
    )


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's content when it is computable without running the model: an initializer that is not
    also a graph input (those are overridable defaults), a Constant node, or evaluable ops (:func:`evaluable_op`) over
    those. None otherwise (:func:`not_constant_reason` says why)."""
    return None if value is None else _constant(value)[0]


def computed_from_constants(value: ir.Value) -> bool:
    """Whether ``value`` is computed from initializers and Constant nodes alone, through ops :func:`constant_array`
    could evaluate (none reading a graph input or drawing random numbers), without evaluating anything: a
    BatchNormalization of it normalises no data (BiT's weight standardisation, ``F.batch_norm(weight, training=True)``)."""
    seen, pending = set(), [value]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        producer = current.producer()
        if current.meta.get(_NOT_CONSTANT) or current.is_graph_input() or (producer is None and current.const_value is None):
            return False
        if producer is not None:
            if not _is_constant_op(producer):
                return False
            pending += [input_value for input_value in producer.inputs if input_value is not None]
    return True


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
            except _TooLarge as error:
                results = [None] * len(producer.outputs)
                reason = f"computed by constants, but its {producer.op_type} would take {error}"
            except Exception as error:  # an op the reference evaluator rejects: treat as not constant
                results = [None] * len(producer.outputs)
                reason = f"computed by a {producer.op_type} that could not be evaluated ({type(error).__name__})"
        known.update(zip(producer.outputs, results))
        for output, result in zip(producer.outputs, results):
            if result is None:
                output.meta[_NOT_CONSTANT] = reasons[output] = reason
    return known[value], reasons.get(value, "")


def drop_if_unread(value: ir.Value | None) -> list[str]:
    """Remove ``value`` and the constant computation behind it once nothing reads any of it; the op types
    of the nodes removed."""
    removed = []
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
        removed.append(producer.op_type)
        pending.extend(inputs)
    return removed
