"""bnfold.onnx_fold.protobuf_writer writes exactly the bytes protobuf's SerializeToString gives."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx_fold import protobuf_writer
from bnfold.onnx_fold.protobuf_writer import SerializedModel

EXAMPLE = Path(__file__).parent.parent / "examples" / "small_cnn.onnx"


def written(model: onnx.ModelProto) -> bytes:
    serialized = SerializedModel(model)
    file = io.BytesIO()
    serialized.write(file)
    assert serialized.size == len(file.getvalue())
    return file.getvalue()


def every_field_model() -> onnx.ModelProto:
    """A model setting fields on both sides of the graph (ModelProto) and of the initializers (GraphProto),
    with a tensor past 2**21 bytes (a four-byte length)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((600, 1000)).astype(np.float32), "w")
    small = numpy_helper.from_array(np.arange(3, dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1000])],
        initializer=[weight, small],
        doc_string="graph doc",
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1000])],
    )
    graph.sparse_initializer.append(
        helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "s"), numpy_helper.from_array(np.array([0, 3]), "i"), [4])
    )
    helper.set_metadata_props(graph, {"graph key": "value"})
    model = helper.make_model(graph, producer_name="test", doc_string="model doc", opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"key": "value"})
    model.functions.append(helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])], [helper.make_opsetid("", 17)]))
    return model


@pytest.mark.parametrize("make", [lambda: onnx.load(EXAMPLE), every_field_model, onnx.ModelProto], ids=["example", "every field", "empty"])
def test_written_bytes_are_serialize_to_string(make):
    model = make()
    assert written(model) == model.SerializeToString()


def test_initializers_are_written_one_by_one():
    """The point of the writer: the model is never serialized whole (a graph of initializers is)."""
    model = every_field_model()
    assert not SerializedModel(model)._whole
    assert SerializedModel(onnx.ModelProto())._whole


def test_many_initializers_and_unknown_fields_are_serialized_whole(monkeypatch):
    model = every_field_model()
    monkeypatch.setattr(protobuf_writer, "_MAX_PIECES", 1)
    assert SerializedModel(model)._whole and written(model) == model.SerializeToString()
    monkeypatch.undo()
    # An unknown field (number 999, varint 1) in the model and in the graph, as a newer ONNX might write.
    unknown = bytes([0xB8, 0x3E, 0x01])
    with_unknown = onnx.ModelProto.FromString(model.SerializeToString() + unknown)
    assert SerializedModel(with_unknown)._whole and written(with_unknown) == with_unknown.SerializeToString()
    graph = onnx.GraphProto.FromString(model.graph.SerializeToString() + unknown)
    model.graph.CopyFrom(graph)
    assert SerializedModel(model)._whole and written(model) == model.SerializeToString()


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**21, 2**31 - 1, 2**35])
def test_varint_is_protobufs(value):
    # dims is field 1, an unpacked repeated int64: key 0x08, then the value as a varint.
    assert onnx.TensorProto(dims=[value]).SerializeToString() == bytes([0x08]) + protobuf_writer._varint(value)
