"""Hand-built ONNX models for the fold tests, and an independent onnxruntime comparison."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RNG_SEED = 1234


def batchnorm_parameters(channels: int, prefix: str, rng: np.random.Generator, dtype=np.float32) -> list[onnx.TensorProto]:
    """Scale, bias, mean and variance that look trained: nothing is 1 or 0."""
    arrays = {
        "scale": rng.uniform(0.5, 1.5, channels),
        "bias": rng.normal(0, 0.3, channels),
        "mean": rng.normal(0, 0.5, channels),
        "var": rng.uniform(0.5, 2.0, channels),
    }
    return [numpy_helper.from_array(a.astype(dtype), f"{prefix}_{k}") for k, a in arrays.items()]


def batchnorm_node(x: str, y: str, prefix: str, **attributes) -> onnx.NodeProto:
    inputs = [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, **attributes)


def initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, list]],
    outputs: list[str],
    initializers: list[onnx.TensorProto],
    opset: int = 17,
    elem_type: int = TensorProto.FLOAT,
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(name, elem_type, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, elem_type, None) for name in outputs],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    # Output shapes come from inference (this onnx's checker insists on a shape field).
    model = onnx.shape_inference.infer_shapes(model)
    if check:  # off for the training-mode models, whose outputs shape inference does not type
        onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    stored = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name in stored:
            continue  # an initializer-backed input (IR version < 4): run on its stored default
        shape = [d.dim_value or 2 for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, atol: float, rtol: float) -> float:
    """Run both in onnxruntime on the same inputs; returns the largest absolute difference."""
    feeds = random_feeds(original)
    worst = 0.0
    for expected, actual in zip(run(original, feeds), run(folded, feeds), strict=True):
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), atol=atol, rtol=rtol)
        worst = max(worst, float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max()))
    return worst


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    """Occurrences of ``op_type`` in the graph and every subgraph."""
    count = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            count += node.op_type == op_type
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)
    return count


def _node_signature(node: onnx.NodeProto) -> tuple:
    attributes = sorted((a.name, a.SerializeToString()) for a in node.attribute)
    return node.op_type, node.domain, node.name, list(node.input), list(node.output), attributes


def _initializer_contents(graph: onnx.GraphProto) -> dict[str, tuple]:
    return {
        t.name: (t.data_type, list(t.dims), numpy_helper.to_array(t).tobytes()) for t in graph.initializer
    }


def _written(model: onnx.ModelProto, pending: dict) -> bytes:
    from bnfold.onnx_fold.protobuf_writer import SerializedModel

    file = io.BytesIO()
    SerializedModel(model, pending).write(file)
    return file.getvalue()


def fast_path_agrees(model: onnx.ModelProto) -> bool:
    """Fold ``model`` with the protobuf fast path and with FoldBatchNormPass. When the fast path takes the
    model, assert that both give the same model (nodes, attributes, names, initializer bytes, graph inputs
    and outputs, initializer order) and the same folds. Either way the input must be left untouched.
    Returns whether the fast path took the model."""
    import onnx_ir as ir

    from bnfold.onnx_fold import FoldBatchNormPass
    from bnfold.onnx_fold.fast_path import fold_plain_pairs

    before = model.SerializeToString()
    result = fold_plain_pairs(model, keep_arrays=True)
    assert model.SerializeToString() == before, "the fast path changed its input"
    if result is None:
        return False
    fast, folds, arrays, pending = result
    assert pending == {}
    # Its large new tensors left without their data (as the command line folds) write the same bytes.
    deferred = fold_plain_pairs(model, leave_data_pending=True)
    assert _written(deferred.model, deferred.pending) == fast.SerializeToString()
    # The values it hands verification are those of the tensors of either model by that name.
    tensors = {tensor.name: tensor for graph in (model.graph, fast.graph) for tensor in graph.initializer}
    assert arrays.keys() <= tensors.keys() and len(arrays) >= 2 * len(folds)
    assert all(array.tobytes() == numpy_helper.to_array(tensors[name]).tobytes() for name, array in arrays.items())
    working = ir.from_proto(model)
    fold_pass = FoldBatchNormPass()
    fold_pass(working)
    slow = ir.to_proto(working)
    assert folds == fold_pass.folds and not fold_pass.skips
    assert [_node_signature(n) for n in fast.graph.node] == [_node_signature(n) for n in slow.graph.node]
    assert list(_initializer_contents(fast.graph).items()) == list(_initializer_contents(slow.graph).items())
    for field in ("input", "output"):
        ours = [v.SerializeToString() for v in getattr(fast.graph, field)]
        assert ours == [v.SerializeToString() for v in getattr(slow.graph, field)], field
    return True
