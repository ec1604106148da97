"""bnfold.onnx_fold.runtime: onnxruntime sessions whose large tensors are handed over as arrays, not
serialized. Each session must compute what a session of the whole serialized model computes, and leave
the model it was made from as it was."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import initializer, make_model, run

from bnfold.onnx_fold.runtime import run_model, runtime_model

RNG = np.random.default_rng(5)


def _conv_gemm_model() -> onnx.ModelProto:
    """A Conv (weight large enough to be handed over), a Reshape (its small shape stays in the graph) and a
    Gemm reading a transposed weight."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], transB=1),
    ]
    initializers = [
        initializer("w", RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)),
        initializer("b", RNG.standard_normal(8).astype(np.float32)),
        initializer("shape", np.array([1, -1], np.int64)),
        initializer("fc", RNG.standard_normal((5, 8 * 6 * 6)).astype(np.float32)),
    ]
    return make_model(nodes, [("x", [1, 3, 6, 6])], ["y"], initializers)


def _feeds() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)}


def test_a_protobuf_model_runs_as_serialized_and_is_left_unchanged():
    model = _conv_gemm_model()
    before = model.SerializeToString()
    feeds = _feeds()
    converted = runtime_model(model)
    assert set(converted.tensors) == {"w", "fc"}  # "b" (32 bytes) and "shape" stay in the graph
    assert all(tensor.data_location == TensorProto.EXTERNAL for tensor in converted.proto.graph.initializer if tensor.name in ("w", "fc"))
    (expected,) = run(model, feeds)
    np.testing.assert_allclose(converted.runner()(feeds)["y"], expected, rtol=1e-6, atol=1e-6)
    assert model.SerializeToString() == before


def test_an_onnx_ir_model_with_external_data_runs_and_keeps_its_tensors(tmp_path):
    model = _conv_gemm_model()
    feeds = _feeds()
    (expected,) = run(model, feeds)
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="model.data", size_threshold=0)
    loaded = ir.load(path)
    tensors = {name: value.const_value for name, value in loaded.graph.initializers.items()}
    assert all(isinstance(tensor, ir.ExternalTensor) for tensor in tensors.values())
    np.testing.assert_allclose(run_model(loaded, feeds)["y"], expected, rtol=1e-6, atol=1e-6)
    # Every tensor is back, the same object (the scratch folder holds none of the model's files: the small
    # external "b" and "shape" went into the graph as values, which shape inference reads).
    assert {name: value.const_value for name, value in loaded.graph.initializers.items()} == tensors
    assert all(value.const_value is tensors[name] for name, value in loaded.graph.initializers.items())


def test_a_non_contiguous_onnx_ir_tensor_runs():
    """onnxruntime takes a provided initializer only in a buffer of its own: a transposed view is copied."""
    model = ir.from_proto(_conv_gemm_model())
    fc = model.graph.initializers["fc"]
    transposed = np.ascontiguousarray(fc.const_value.numpy().T).T  # the same values, Fortran order
    assert not transposed.flags.c_contiguous
    fc.const_value = ir.tensor(transposed, name="fc")
    feeds = _feeds()
    (expected,) = run(ir.to_proto(model), feeds)
    np.testing.assert_allclose(run_model(model, feeds)["y"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("element_type", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_half_precision_initializers_go_over_as_their_bits(element_type):
    dtype = np.float16 if element_type == TensorProto.FLOAT16 else ml_dtypes.bfloat16
    values = RNG.standard_normal(256).astype(dtype)
    tensor = helper.make_tensor("t", element_type, [256], values.view(np.uint16).tobytes(), raw=True)
    nodes = [helper.make_node("Cast", ["t"], ["t32"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "t32"], ["y"])]
    model = make_model(nodes, [("x", [256])], ["y"], [tensor])
    converted = runtime_model(model)
    assert set(converted.tensors) == {"t"}
    x = RNG.standard_normal(256).astype(np.float32)
    np.testing.assert_array_equal(converted.runner()({"x": x})["y"], x + values.astype(np.float32))
    np.testing.assert_array_equal(converted.array(model.graph.initializer[0]), values)


def test_a_small_array_added_to_the_graph_stays_inline_and_a_large_one_goes_over():
    model = runtime_model(make_model([helper.make_node("Add", ["x", "x"], ["y"])], [("x", [64])], ["y"], []))
    model.add_initializer("small", np.ones(1, np.float32))
    model.add_initializer("large", np.arange(64, dtype=np.float32))
    model.proto.graph.node.append(helper.make_node("Add", ["y", "large"], ["z"]))
    model.proto.graph.node.append(helper.make_node("Add", ["y", "small"], ["s"]))
    model.add_output("z")
    model.add_output("z")  # once only
    assert [output.name for output in model.proto.graph.output] == ["y", "z"]
    assert set(model.tensors) == {"large"}
    assert numpy_helper.to_array(next(t for t in model.proto.graph.initializer if t.name == "small")).tolist() == [1]
    x = np.ones(64, np.float32)
    np.testing.assert_array_equal(model.runner()({"x": x})["z"], 2 + np.arange(64, dtype=np.float32))
