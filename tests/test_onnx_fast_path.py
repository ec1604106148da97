"""The protobuf fast path (bnfold.onnx_fold.fast_path): it takes a model only when FoldBatchNormPass would fold
every BatchNorm into the layer before it and nothing else, and then gives the pass's exact result.

``fast_path_agrees`` (tests/onnx_models.py) runs both and compares nodes, names, attributes, initializer
bytes and graph inputs/outputs; every model test_onnx_fold.py folds goes through it as well."""

from __future__ import annotations

import gc
import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_models import batchnorm_node, batchnorm_parameters, fast_path_agrees, initializer, make_model

from bnfold import fold_onnx
from bnfold.testing import conv_bn_chain


def conv_bn_pair(**change) -> onnx.ModelProto:
    """x -> Conv(W, B) -> BatchNorm -> Relu -> z, with ``change`` applied to the pieces."""
    r = np.random.default_rng(5)
    inits = [
        initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)),
        initializer("B", r.normal(size=6).astype(np.float32)),
        *batchnorm_parameters(6, "bn", r),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv"),
        batchnorm_node("y", "n", "bn"),
        helper.make_node("Relu", ["n"], ["z"], name="relu"),
    ]
    inputs, outputs = [("x", [1, 4, 8, 8])], ["z"]
    if "extra_nodes" in change:
        nodes += change["extra_nodes"]
    outputs += change.get("extra_outputs", [])
    inputs += change.get("extra_inputs", [])
    model = make_model(nodes, inputs, outputs, inits + change.get("extra_initializers", []))
    return model


def test_chain_takes_the_fast_path_with_the_pass_result():
    assert fast_path_agrees(conv_bn_chain(40))


def test_batchnorms_sharing_statistics_and_an_output_read_twice_take_the_fast_path():
    r = np.random.default_rng(2)
    inits = [initializer(f"W{i}", r.normal(size=[4, 4, 1, 1]).astype(np.float32)) for i in range(2)]
    inits += batchnorm_parameters(4, "bn", r)  # both BatchNorms read the same statistics
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["c0"], name="conv0"),
        batchnorm_node("c0", "b0", "bn"),
        helper.make_node("Conv", ["b0", "W1"], ["c1"], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b1"], name="bn1"),
        helper.make_node("Add", ["b0", "b1"], ["z"], name="residual"),  # b0 read twice, b1 a runtime operand
    ]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], ["z", "b1"], inits)  # b1 also a graph output
    assert fast_path_agrees(model)
    folded, report = fold_onnx(model)
    assert len(report.folds) == 2 and report.verification.passed
    assert not {"bn_scale", "bn_bias", "bn_mean", "bn_var"} & {t.name for t in folded.graph.initializer}


def _elementwise_after_conv() -> onnx.ModelProto:
    r = np.random.default_rng(1)
    return conv_bn_pair(
        extra_nodes=[helper.make_node("Conv", ["x", "W2"], ["y2"], name="conv2"), helper.make_node("Mul", ["y2", "k"], ["m"])],
        extra_outputs=["m"],
        extra_initializers=[
            initializer("W2", r.normal(size=[6, 4, 3, 3]).astype(np.float32)),
            initializer("k", np.full([6, 1, 1], 1.5, np.float32)),
        ],
    )


def _statistics_from_input():
    model = conv_bn_pair()
    mean = next(t for t in model.graph.initializer if t.name == "bn_mean")
    model.graph.input.append(helper.make_tensor_value_info("bn_mean", TensorProto.FLOAT, list(mean.dims)))
    return model


def _nan_variance():
    model = conv_bn_pair()
    var = next(t for t in model.graph.initializer if t.name == "bn_var")
    var.CopyFrom(initializer("bn_var", np.array([1, 1, np.nan, 1, 1, 1], np.float32)))
    return model


def _training_mode():
    model = conv_bn_pair()
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    return model


def _external_weight():
    model = conv_bn_pair()
    weight = model.graph.initializer[0]
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="weights.bin")
    return model


def _shape_of_conv_output():
    return conv_bn_pair(
        extra_nodes=[helper.make_node("Shape", ["y"], ["s"]), helper.make_node("Cast", ["s"], ["shape"], to=TensorProto.FLOAT)],
        extra_outputs=["shape"],
    )


def _quantized_weight():
    """QDQ: the Conv's weight is DequantizeLinear(int8, per-channel scale)."""
    r = np.random.default_rng(5)
    inits = [
        initializer("W_q", r.integers(-127, 128, [6, 4, 3, 3]).astype(np.int8)),
        initializer("W_scale", np.full(6, 0.01, np.float32)),
        *batchnorm_parameters(6, "bn", r),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["W_q", "W_scale"], ["W"], name="dequantize", axis=0),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        batchnorm_node("y", "z", "bn"),
    ]
    return make_model(nodes, [("x", [1, 4, 8, 8])], ["z"], inits)


def _matmul_flatten_batchnorm():
    """LeViT's LinearNorm: MatMul on [B, N, K] -> Flatten to [B*N, C] -> BatchNorm."""
    r = np.random.default_rng(5)
    inits = [initializer("W", r.normal(size=[8, 6]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
        helper.make_node("Flatten", ["m"], ["f"], name="flatten", axis=2),
        batchnorm_node("f", "z", "bn"),
    ]
    return make_model(nodes, [("x", [2, 5, 8])], ["z"], inits)


DECLINED = {
    # The pass folds the Mul too; the fast path folds BatchNorms only, so it must leave the model to the pass.
    "per-channel Mul after a Conv": _elementwise_after_conv,
    "Conv output also a graph output": lambda: conv_bn_pair(extra_outputs=["y"]),
    "weight also read by another node": lambda: conv_bn_pair(
        extra_nodes=[helper.make_node("Identity", ["W"], ["w_copy"])], extra_outputs=["w_copy"]
    ),
    "statistics from a graph input": _statistics_from_input,
    "NaN statistics (the pass names the channel)": _nan_variance,
    "training-mode BatchNorm": _training_mode,
    "weight in external data": _external_weight,
    # Forms the pass folds (issue 15) and the fast path leaves to it.
    "Conv output also read by Shape": _shape_of_conv_output,
    "QDQ weight": _quantized_weight,
    "MatMul -> Flatten -> BatchNorm": _matmul_flatten_batchnorm,
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_fast_path_declines_and_leaves_the_model_untouched(case):
    assert not fast_path_agrees(DECLINED[case]())


@pytest.mark.parametrize("case", ["Conv output also read by Shape", "QDQ weight", "MatMul -> Flatten -> BatchNorm"])
def test_the_pass_folds_what_the_fast_path_declines(case):
    _, report = fold_onnx(DECLINED[case]())
    assert len(report.folds) == 1 and not report.skips and report.verification.passed


def test_fold_onnx_restores_the_garbage_collector_state():
    fold_onnx(conv_bn_chain(3), verify=False)
    assert gc.isenabled()
    gc.disable()
    try:
        fold_onnx(conv_bn_chain(3), verify=False)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_large_new_tensors_go_to_the_file_from_the_folds_arrays(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bnfold.cli import main
    from bnfold.onnx_fold import protobuf_writer
    from bnfold.onnx_fold.fast_path import fold_plain_pairs

    model = conv_bn_chain(3, channels=160)  # 100 KiB weights: their data stays out of the folded protobuf
    assert fast_path_agrees(model)  # (which also compares the bytes written from the arrays with protobuf's)
    deferred = fold_plain_pairs(model, leave_data_pending=True)
    assert len(deferred.pending) == 3
    assert not any(tensor.HasField("raw_data") for tensor in deferred.model.graph.initializer if tensor.name in deferred.pending)
    expected = fold_onnx(model, verify=False)[0].SerializeToString()
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    for flags in ([], ["--no-verify"]):  # verification runs the folded model from the arrays too
        output = tmp_path / f"folded{len(flags)}.onnx"
        result = CliRunner().invoke(main, [str(path), "-o", str(output), *flags])
        assert result.exit_code == 0, result.output
        assert output.read_bytes() == expected
    # A model serialized whole (past the writer's count of pieces) gets the data into its protobuf first.
    monkeypatch.setattr(protobuf_writer, "_MAX_PIECES", 0)
    deferred = fold_plain_pairs(model, leave_data_pending=True)
    file = io.BytesIO()
    protobuf_writer.SerializedModel(deferred.model, deferred.pending).write(file)
    assert file.getvalue() == expected and deferred.pending == {}
