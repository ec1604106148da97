"""ONNX front-end: every row of what must fold, and every refusal with its reason.

Each fold test checks the BatchNorms left, the report, and the outputs against the original in
onnxruntime (optimisations off) with explicit tolerances: float32 atol 1e-5 / rtol 1e-4 on hand-built
single-layer models (the errors reached are around 1e-6), float64 1e-12, float16 2e-2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import (
    assert_same_outputs,
    batchnorm_node,
    batchnorm_parameters,
    fast_path_agrees,
    initializer,
    make_model,
    op_count,
)

from bnfold import fold_onnx
from bnfold.testing import conv_bn_chain

F32 = dict(atol=1e-5, rtol=1e-4)


def rng():
    return np.random.default_rng(0)


def folded(model: onnx.ModelProto, **kwargs):
    fast_path_agrees(model)
    result, report = fold_onnx(model, **kwargs)
    if report.folds:
        onnx.checker.check_model(result)
    return result, report


def conv_bn(dims=2, bias=True, groups=1, cin=4, cout=6, op="Conv", pads=None, dtype=np.float32, elem=TensorProto.FLOAT):
    r = rng()
    kernel = [3] * dims
    if op == "Conv":
        weight = r.normal(size=[cout, cin // groups, *kernel])
    else:
        weight = r.normal(size=[cin, cout // groups, *kernel])
    inits = [initializer("W", weight.astype(dtype)), *batchnorm_parameters(cout, "bn", r, dtype)]
    inputs = ["x", "W"]
    if bias:
        inits.append(initializer("B", r.normal(size=cout).astype(dtype)))
        inputs.append("B")
    attrs = {"group": groups}
    if pads is not None:
        attrs["pads"] = pads
    nodes = [helper.make_node(op, inputs, ["y"], name="layer", **attrs), batchnorm_node("y", "z", "bn")]
    return make_model(nodes, [("x", [2, cin, *[7] * dims])], ["z"], inits, elem_type=elem)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (2, 4, 6), (6, 6, 6)])
def test_conv_then_batchnorm_folds(dims, bias, groups, cin, cout):
    model = conv_bn(dims, bias, groups, cin, cout)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 0
    assert [(f.batchnorm, f.layer, f.direction) for f in report.folds] == [("bn", "layer", "into-preceding")]
    assert report.verification.passed
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (2, 4, 6), (3, 6, 9), (6, 6, 6)])
def test_conv_transpose_then_batchnorm_folds(bias, groups, cin, cout):
    model = conv_bn(2, bias, groups, cin, cout, op="ConvTranspose")
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 0
    assert report.folds[0].layer_op == "ConvTranspose"
    assert_same_outputs(model, result, **F32)


def gemm_bn(trans_a, trans_b, alpha, beta, c_shape, m=3, k=5, n=4, dtype=np.float32, elem=TensorProto.FLOAT):
    r = rng()
    weight = r.normal(size=[n, k] if trans_b else [k, n]).astype(dtype)
    inits = [initializer("W", weight), *batchnorm_parameters(n, "bn", r, dtype)]
    inputs = ["x", "W"]
    if c_shape is not None:
        inits.append(initializer("C", r.normal(size=c_shape).astype(dtype)))
        inputs.append("C")
    nodes = [
        helper.make_node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta),
        batchnorm_node("y", "z", "bn"),
    ]
    return make_model(nodes, [("x", [k, m] if trans_a else [m, k])], ["z"], inits, elem_type=elem)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.5, 0.0), (0.0, 1.0)])  # alpha 0: the weight is ignored
@pytest.mark.parametrize("c_shape", [None, [], [4], [1, 4], [3, 4]])
def test_gemm_then_batchnorm_folds(trans_a, trans_b, alpha, beta, c_shape):
    model = gemm_bn(trans_a, trans_b, alpha, beta, c_shape)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 0
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize("c_shape", [[3, 4], [3, 1], [4, 4]])
def test_gemm_bias_varying_along_rows_is_measured_in_half_precision(c_shape):
    # The half-precision error took a Gemm's C for one value per output channel: [M, N] and [M, 1] broke numpy's
    # broadcasting (an internal error in `bnfold --target-dtype float16` and `bnfold check`), [N, N] read rows as channels.
    rows = c_shape[0]
    model = gemm_bn(0, 0, 1.0, 1.0, c_shape, m=rows)
    _, report = folded(model, verify=False, target_dtype="float16")
    # Each channel's C stands for its rows by their mean: about the figures of the Gemm with that mean as its C.
    c = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "C"))
    per_channel = gemm_bn(0, 0, 1.0, 1.0, [4], m=rows)
    mean = np.broadcast_to(c, (rows, 4)).mean(axis=0, dtype=np.float64).astype(np.float32)
    next(t for t in per_channel.graph.initializer if t.name == "C").CopyFrom(initializer("C", mean))
    _, expected = folded(per_channel, verify=False, target_dtype="float16")
    error, expected_error = (r.quantization[0].target.error for r in (report, expected))
    assert error.unfolded_error == pytest.approx(expected_error.unfolded_error, rel=1e-3)
    assert error.folded_error == pytest.approx(expected_error.folded_error, rel=1e-3)


@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_then_batchnorm_folds_and_gets_a_bias(with_bias):
    r = rng()
    inits = [initializer("W", r.normal(size=[5, 4]).astype(np.float32)), *batchnorm_parameters(4, "bn", r)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm")]
    if with_bias:
        inits.append(initializer("b", r.normal(size=[4]).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="bias"))
    nodes.append(batchnorm_node("y" if with_bias else "m", "z", "bn"))
    model = make_model(nodes, [("x", [3, 5])], ["z"], inits)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 0
    assert op_count(result, "Add") == 1
    assert_same_outputs(model, result, **F32)


def test_matmul_on_3d_data_is_refused_because_channel_axis_differs():
    r = rng()
    inits = [initializer("W", r.normal(size=[5, 4]).astype(np.float32)), *batchnorm_parameters(3, "bn", r)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), batchnorm_node("m", "z", "bn")]
    model = make_model(nodes, [("x", [2, 3, 5])], ["z"], inits)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 1
    assert [s.code for s in report.skips] == ["channel-mismatch"]
    assert "3-D" in report.skips[0].reason


def test_weights_from_constant_nodes_fold():
    r = rng()
    nodes = [
        helper.make_node("Constant", [], ["W"], value=initializer("w", r.normal(size=[6, 4, 3, 3]).astype(np.float32))),
        helper.make_node("Constant", [], ["B"], value=initializer("b", r.normal(size=[6]).astype(np.float32))),
        helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv"),
        batchnorm_node("y", "z", "bn"),
    ]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], batchnorm_parameters(6, "bn", r))
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 0
    assert op_count(result, "Constant") == 0  # the old weight constants are gone, not left dead
    assert_same_outputs(model, result, **F32)


def test_shared_weight_is_copied_not_changed_under_the_other_user():
    r = rng()
    inits = [initializer("W", r.normal(size=[4, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(4, "bn", r)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv_a", pads=[1, 1, 1, 1]),
        batchnorm_node("y", "z", "bn"),
        helper.make_node("Conv", ["z", "W"], ["out"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["out"], inits)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 0
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in result.graph.initializer}
    conv_b = next(n for n in result.graph.node if n.name == "conv_b")
    np.testing.assert_array_equal(weights[conv_b.input[1]], onnx.numpy_helper.to_array(inits[0]))
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize(
    "opset,attributes",
    [(6, {"is_test": 1, "spatial": 1}), (7, {"spatial": 1}), (9, {}), (14, {"training_mode": 0}), (15, {}), (21, {})],
)
def test_batchnorm_of_every_opset_folds(opset, attributes):
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), batchnorm_node("y", "z", "bn", **attributes)]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits, opset=opset)
    # onnxruntime has no BatchNormalization-6 kernel: that model is checked against the opset 7 fold.
    result, report = folded(model, verify=opset > 6)
    assert op_count(result, "BatchNormalization") == 0
    if opset > 6:
        assert_same_outputs(model, result, **F32)
    else:
        nodes[1] = batchnorm_node("y", "z", "bn", spatial=1)
        reference, _ = folded(make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits, opset=7))
        for got, expected in zip(result.graph.initializer, reference.graph.initializer, strict=True):
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(got), onnx.numpy_helper.to_array(expected))


def test_training_mode_batchnorm_is_refused():
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), batchnorm_node("y", "z", "bn", training_mode=1)]
    model = make_model(nodes, [("x", [2, 4, 6, 6])], ["z"], inits, check=False)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 1
    assert [(s.batchnorm, s.code) for s in report.skips] == [("bn", "training-mode")]
    assert "eval" in report.skips[0].reason


def test_batchnorm_with_statistics_outputs_read_is_refused():
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    bn = batchnorm_node("y", "z", "bn")
    bn.output.extend(["running_mean", "running_var"])
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), bn]
    model = make_model(nodes, [("x", [2, 4, 6, 6])], ["z"], inits, opset=9, check=False)
    model.graph.output.append(helper.make_tensor_value_info("running_mean", TensorProto.FLOAT, None))
    result, report = folded(model)
    assert [s.code for s in report.skips] == ["extra-outputs-used"]
    assert "running_mean" in report.skips[0].reason


def test_opset9_batchnorm_declaring_statistics_outputs_is_training_mode():
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    bn = batchnorm_node("y", "z", "bn")
    bn.output.extend(["m", "v", "sm", "sv"])
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), bn]
    model = make_model(nodes, [("x", [2, 4, 6, 6])], ["z"], inits, opset=9, check=False)
    result, report = folded(model)
    assert [s.code for s in report.skips] == ["training-mode"]


def test_batchnorm_inside_if_branch_folds():
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]

    def branch(name, with_bn):
        nodes = [helper.make_node("Conv", ["x", "W"], [f"{name}_y"], name=f"{name}_conv")]
        out = f"{name}_y"
        if with_bn:
            nodes.append(batchnorm_node(f"{name}_y", f"{name}_z", "bn"))
            out = f"{name}_z"
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=branch("then", True), else_branch=branch("else", False)),
    ]
    inits.append(initializer("zero", np.array(0.0, np.float32)))
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits)
    result, report = folded(model)
    assert op_count(model, "BatchNormalization") == 1
    assert op_count(result, "BatchNormalization") == 0
    assert report.folds[0].graph == "then"
    for seed_sign in (1.0, -1.0):  # both branches
        feeds = {"x": np.abs(np.random.default_rng(3).standard_normal([1, 4, 6, 6])).astype(np.float32) * seed_sign}
        from onnx_models import run

        np.testing.assert_allclose(run(result, feeds)[0], run(model, feeds)[0], **F32)


@pytest.mark.parametrize(
    "op,const_shape,data_first",
    [("Mul", [6, 1, 1], True), ("Add", [1, 6, 1, 1], False), ("Sub", [6, 1, 1], True), ("Sub", [6, 1, 1], False),
     ("Div", [6, 1, 1], True), ("Mul", [], True), ("Add", [1], True)],
)  # fmt: skip
def test_per_channel_elementwise_after_conv_folds(op, const_shape, data_first):
    r = rng()
    constant = r.uniform(0.5, 1.5, const_shape).astype(np.float32)
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), initializer("c", constant)]
    inputs = ["y", "c"] if data_first else ["c", "y"]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), helper.make_node(op, inputs, ["z"], name="affine")]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits)
    result, report = folded(model)
    assert op_count(result, op) == 0
    assert [(f.batchnorm, f.batchnorm_op) for f in report.folds] == [("affine", op)]
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
@pytest.mark.parametrize("passthrough", ["Identity", "Dropout"])
def test_per_channel_elementwise_folds_through_a_passthrough(op, passthrough):
    # The data operand is the passthrough's output, not the layer's: each op with the data first was refused.
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), initializer("c", r.uniform(0.5, 1.5, [6, 1, 1]).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        helper.make_node(passthrough, ["y"], ["p"], name="between"),
        helper.make_node(op, ["p", "c"], ["z"], name="affine"),
    ]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits)
    result, report = folded(model)
    assert op_count(result, op) == 0 and op_count(result, passthrough) == 1
    assert [(f.batchnorm, f.layer) for f in report.folds] == [("affine", "conv")]
    assert [check.status for check in report.verification.folds] == ["passed"]
    assert_same_outputs(model, result, **F32)


def test_mul_that_is_not_per_channel_is_left_alone():
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), initializer("c", r.normal(size=[1, 1, 4, 4]).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), helper.make_node("Mul", ["y", "c"], ["z"])]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits)
    result, report = folded(model)
    assert op_count(result, "Mul") == 1 and report.folds == [] and report.skips == []


@pytest.mark.parametrize(
    "dtype,elem,tolerance",
    [(np.float16, TensorProto.FLOAT16, dict(atol=2e-2, rtol=2e-2)), (np.float64, TensorProto.DOUBLE, dict(atol=1e-12, rtol=1e-12))],
)
def test_half_and_double_models_fold_in_their_dtype(dtype, elem, tolerance):
    # Gemm: onnxruntime's CPU Conv has no float64 kernel.
    model = gemm_bn(0, 1, 1.0, 1.0, [4], dtype=dtype, elem=elem)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 0
    assert {init.data_type for init in result.graph.initializer} == {elem}
    assert_same_outputs(model, result, **tolerance)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])  # the fast path and the pass
def test_default_epsilon_is_the_float32_attribute_runtimes_use(op):
    # No epsilon attribute: its default is 1e-5 as a float32 (onnxruntime computes with 9.99999975e-06), which a
    # float64 model with a small variance tells from 1e-5 well past float64's tolerances.
    r = rng()
    inits = [initializer("W", r.normal(size=[5, 4])), *batchnorm_parameters(4, "bn", r, np.float64)]
    inits[-1] = initializer("bn_var", np.array([1e-4, 3e-4, 0.01, 1.0]))
    nodes = [helper.make_node(op, ["x", "W"], ["y"], name="layer"), batchnorm_node("y", "z", "bn")]
    model = make_model(nodes, [("x", [3, 5])], ["z"], inits, elem_type=TensorProto.DOUBLE)
    result, report = folded(model)
    assert report.verification.passed and op_count(result, "BatchNormalization") == 0
    assert_same_outputs(model, result, atol=1e-12, rtol=1e-12)


def test_bfloat16_weights_are_rounded_once_from_float64():
    model = conv_bn(2, True, 1, 4, 6, dtype=np.float32)
    import ml_dtypes

    for init in model.graph.initializer:
        array = onnx.numpy_helper.to_array(init).astype(ml_dtypes.bfloat16)
        init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    result, report = folded(model, verify=False)  # onnxruntime has no bfloat16 Conv on CPU
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in result.graph.initializer}
    conv = next(n for n in result.graph.node if n.op_type == "Conv")
    originals = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    scale = originals["bn_scale"] / np.sqrt(originals["bn_var"] + 1e-5)
    exact = originals["W"] * scale[:, None, None, None]
    got = weights[conv.input[1]]
    assert got.dtype == ml_dtypes.bfloat16
    # Each weight is the bfloat16 nearest to the exact float64 product.
    bits = got.view(np.uint16).astype(np.int32)
    error = np.abs(exact - got.astype(np.float64))
    for step in (-1, 1):
        neighbour = (bits + step).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
        assert np.all(error <= np.abs(exact - neighbour))


def batchnorm_then(layer: str, **attributes):
    r = rng()
    inits = batchnorm_parameters(4, "bn", r)
    if layer == "Conv":
        inits.append(initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)))
        shape = [1, 4, 7, 7]
    else:
        inits.append(initializer("W", r.normal(size=[4, 6] if not attributes.get("transB") else [6, 4]).astype(np.float32)))
        shape = [3, 4]
    nodes = [batchnorm_node("x", "n", "bn"), helper.make_node(layer, ["n", "W"], ["z"], name="layer", **attributes)]
    return make_model(nodes, [("x", shape)], ["z"], inits)


@pytest.mark.parametrize(
    "layer,attributes",
    [("Conv", {}), ("Conv", {"pads": [0, 0, 0, 0], "auto_pad": "NOTSET"}), ("Conv", {"auto_pad": "VALID"}),
     ("Gemm", {}), ("Gemm", {"transB": 1, "alpha": 0.5}), ("Gemm", {"alpha": 0.0}), ("MatMul", {})],
)  # fmt: skip
def test_batchnorm_before_an_unpadded_layer_folds_forward(layer, attributes):
    model = batchnorm_then(layer, **attributes)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 0
    assert [f.direction for f in report.folds] == ["into-following"]
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize("attributes", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}])
def test_batchnorm_before_a_padded_conv_is_refused(attributes):
    result, report = folded(batchnorm_then("Conv", **attributes))
    assert op_count(result, "BatchNormalization") == 1
    assert [s.code for s in report.skips] == ["padded-conv"]


def test_layer_output_read_elsewhere_is_refused():
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        batchnorm_node("y", "z", "bn"),
        helper.make_node("Relu", ["y"], ["r"]),
    ]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z", "r"], inits)
    result, report = folded(model)
    assert [s.code for s in report.skips] == ["layer-output-shared"]
    assert "conv" in report.skips[0].reason


def test_weight_from_graph_input_is_refused():
    r = rng()
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), batchnorm_node("y", "z", "bn")]
    model = make_model(nodes, [("x", [1, 4, 6, 6]), ("W", [6, 4, 3, 3])], ["z"], batchnorm_parameters(6, "bn", r))
    result, report = folded(model)
    assert [s.code for s in report.skips] == ["weight-not-constant"]
    assert "graph input" in report.skips[0].reason


@pytest.mark.parametrize(
    "field,value,words", [("var", -0.5, "negative"), ("mean", np.nan, "NaN"), ("scale", np.inf, "Inf")]
)
def test_unfoldable_statistics_are_refused(field, value, words):
    model = conv_bn()
    for init in model.graph.initializer:
        if init.name == f"bn_{field}":
            array = onnx.numpy_helper.to_array(init).copy()
            array[2] = value
            init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    result, report = folded(model, verify=False)
    assert [s.code for s in report.skips] == ["unfoldable-statistics"]
    assert words in report.skips[0].reason and "channel 2" in report.skips[0].reason


def test_pre_activation_batchnorm_is_left_with_reason():
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(4, "bn", r)]
    nodes = [batchnorm_node("x", "n", "bn"), helper.make_node("Relu", ["n"], ["a"]), helper.make_node("Conv", ["a", "W"], ["z"])]
    result, report = folded(make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits))
    assert [s.code for s in report.skips] == ["no-foldable-neighbour"]
    assert "Relu" in report.skips[0].reason


def test_graph_output_name_and_type_are_kept_when_the_batchnorm_produced_it():
    model = conv_bn_chain(2)  # no value_info for the Conv outputs, as most exporters write it
    result, _ = folded(model, verify=False)
    assert [o.name for o in result.graph.output] == ["output"]
    assert result.graph.output[0].type == model.graph.output[0].type
    onnx.checker.check_model(result, full_check=True)


def test_folds_of_layers_sharing_a_name_are_not_measured_as_each_other():
    # Node names need not be unique; the quantization figures looked each fold's nodes up by name and took the last
    # node of it: a fold measured with another's layer and statistics, or a numpy error when their sizes differ.
    r = rng()
    inits = [initializer("W1", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), initializer("W2", r.normal(size=[3, 6, 1, 1]).astype(np.float32))]
    inits += [*batchnorm_parameters(6, "bn1", r), *batchnorm_parameters(3, "bn2", r)]
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["y1"], name="layer"),
        batchnorm_node("y1", "z1", "bn1"),
        helper.make_node("Conv", ["z1", "W2"], ["y2"], name="layer"),
        batchnorm_node("y2", "z2", "bn2"),
        helper.make_node("Conv", ["z2", "W3"], ["y3"], name="last"),
        batchnorm_node("y3", "z3", "bn3"),
    ]
    inits += [initializer("W3", r.normal(size=[2, 3, 1, 1]).astype(np.float32)), *batchnorm_parameters(2, "bn3", r)]
    model = make_model(nodes, [("x", [1, 4, 7, 7])], ["z3"], inits)
    _, report = folded(model, verify=False, target_dtype="float16")
    assert len(report.folds) == 3
    assert [(m.batchnorm, m.layer) for m in report.quantization] == [("bn3", "last")]


def test_input_model_object_is_not_modified():
    model = conv_bn()
    before = model.SerializeToString()
    folded(model)
    assert model.SerializeToString() == before


def test_folding_a_batchnorm_nobody_reads_removes_no_run_time_node():
    # The layer's output is unread once the BatchNorm goes: it and the nodes before it were removed as if they
    # were constants computing a weight, and the report said so ("evaluated 3 constant node(s) ... Conv x1").
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W"], ["y"], name="conv"),
        helper.make_node("Identity", ["y"], ["i"], name="between"),
        batchnorm_node("i", "unread", "bn"),
        helper.make_node("Sigmoid", ["x"], ["out"], name="output"),
    ]
    model = make_model(nodes, [("x", [1, 4, 7, 7])], ["out"], inits)
    result, report = folded(model)
    assert len(report.folds) == 1
    assert [node.op_type for node in result.graph.node] == ["Relu", "Conv", "Identity", "Sigmoid"]
    assert not any("constant node(s)" in note for note in report.notes)


def test_batchnorm_inside_loop_body_folds():
    r = rng()
    inits = [initializer("W", r.normal(size=[4, 4, 1, 1]).astype(np.float32) * 0.5), *batchnorm_parameters(4, "bn", r)]
    inits.append(initializer("trip", np.array(3, np.int64)))
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Conv", ["state", "W"], ["y"], name="body_conv"),
            batchnorm_node("y", "state_out", "bn"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 4, 5, 5]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 4, 5, 5]),
        ],
    )
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["z"], body=body, name="loop")]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], ["z"], inits, check=False)
    result, report = fold_onnx(model)  # no checker: shape inference leaves the Loop's output untyped
    assert op_count(result, "BatchNormalization") == 0
    assert [(f.batchnorm, f.graph) for f in report.folds] == [("bn", "loop_body")]
    assert_same_outputs(model, result, **F32)


def test_batchnorm_in_subgraph_after_outer_conv_is_left():
    r = rng()
    inits = [initializer("W", r.normal(size=[4, 4, 1, 1]).astype(np.float32)), *batchnorm_parameters(4, "bn", r)]
    inits.append(initializer("flag", np.array(True)))
    branch = lambda name, nodes, out: helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])  # noqa: E731
    then_branch = branch("then", [batchnorm_node("y", "t", "bn")], "t")
    else_branch = branch("else", [helper.make_node("Relu", ["y"], ["e"])], "e")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        helper.make_node("If", ["flag"], ["z"], then_branch=then_branch, else_branch=else_branch),
    ]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], ["z"], inits, check=False)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 1
    assert [s.code for s in report.skips] == ["no-foldable-neighbour"]
    assert "enclosing graph" in report.skips[0].reason


def test_legacy_broadcast_mul_is_left_alone():
    r = rng()
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), initializer("c", r.normal(size=[6]).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"]), helper.make_node("Mul", ["y", "c"], ["z"], broadcast=1, axis=1)]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits, opset=6, check=False)
    result, report = folded(model, verify=False)
    assert op_count(result, "Mul") == 1 and report.folds == []


def test_weight_behind_a_deep_constant_computation_folds_without_recursion():
    """A weight reached through thousands of Identity/Cast nodes: evaluated iteratively, then removed."""
    r = rng()
    nodes, current = [], "W"
    for index in range(3000):
        op = "Identity" if index % 2 else "Cast"
        attrs = {"to": TensorProto.FLOAT} if op == "Cast" else {}
        nodes.append(helper.make_node(op, [current], [f"w{index}"], **attrs))
        current = f"w{index}"
    nodes += [helper.make_node("Conv", ["x", current], ["y"], name="conv"), batchnorm_node("y", "z", "bn")]
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits)
    result, report = folded(model)
    assert op_count(result, "BatchNormalization") == 0
    assert len(result.graph.node) == 1  # the whole weight computation was dropped once unread
    assert_same_outputs(model, result, **F32)


def test_constant_queries_along_a_long_runtime_add_chain_stay_linear(monkeypatch):
    """Every Add of a run-time chain asks whether its operands are constant; without memoising the
    answer each question would walk the whole chain back to the input (quadratic work)."""
    from bnfold.onnx_fold import constants as onnx_constants

    visits = []
    original = onnx_constants._is_constant_op
    monkeypatch.setattr(onnx_constants, "_is_constant_op", lambda node: visits.append(node) or original(node))
    length = 2000
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"a{i - 1}", "c"], [f"a{i}"]) for i in range(length)]
    model = make_model(nodes, [("x", [1, 4])], [f"a{length - 1}"], [initializer("c", np.ones(4, np.float32))])
    result, report = folded(model, verify=False)
    assert report.folds == [] and len(result.graph.node) == length
    assert len(visits) < 5 * length


def _function_model_initializers(channels: int) -> list[onnx.TensorProto]:
    """A BatchNorm's scale, bias, mean and var, and a 3x3 Conv weight W from 3 channels: what the function models read."""
    r = np.random.default_rng(0)
    stats = {"scale": r.uniform(0.5, 1.5, channels), "bias": r.normal(size=channels), "mean": r.normal(size=channels),
             "var": r.uniform(0.5, 2.0, channels)}  # fmt: skip
    inits = [initializer(name, value.astype(np.float32)) for name, value in stats.items()]
    return [*inits, initializer("W", r.normal(size=(channels, 3, 3, 3)).astype(np.float32))]


def test_batchnorms_in_model_local_functions_are_folded_where_the_graph_calls_them():
    """torch.onnx.export's export_modules_as_functions: each Conv+BatchNorm a function the graph calls. That
    function is inlined and folded; a function without a BatchNorm stays a function."""
    channels = 4
    inits = _function_model_initializers(channels)
    conv_bn = helper.make_function(
        "local", "ConvBN", ["x", "W", "scale", "bias", "mean", "var"], ["y"],
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn")],
        [helper.make_opsetid("", 15)],
    )  # fmt: skip
    activation = helper.make_function("local", "Act", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])], [helper.make_opsetid("", 15)])
    graph = helper.make_graph(
        [helper.make_node("ConvBN", ["input", "W", "scale", "bias", "mean", "var"], ["h"], domain="local", name="block"),
         helper.make_node("Act", ["h"], ["output"], domain="local", name="act")],
        "functions", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, 8, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)], functions=[conv_bn, activation])
    model.ir_version = 8
    folded, report = fold_onnx(model)
    assert [fold.batchnorm for fold in report.folds] == ["bn"] and report.verification.passed
    assert "inlined the model-local function(s) local.ConvBN," in " ".join(report.notes)
    assert [function.name for function in folded.functions] == ["Act"] and op_count(folded, "BatchNormalization") == 0
    assert_same_outputs(model, folded, atol=1e-5, rtol=1e-4)


def _nested_functions_model(relu_first: bool) -> onnx.ModelProto:
    """As torch.onnx.export(export_modules_as_functions=True) writes a model: the graph calls a Block function,
    which calls a Conv2d, a BatchNorm2d and a ReLU function of their own domains (ReLU before the BatchNorm with
    ``relu_first``)."""
    channels = 4
    inits = _function_model_initializers(channels)
    opset = [helper.make_opsetid("", 17)]
    conv = helper.make_function("torch.nn.modules.conv", "Conv2d", ["x", "W"], ["y"], [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], opset)
    norm = helper.make_function("torch.nn.modules.batchnorm", "BatchNorm2d", ["x", "s", "b", "m", "v"], ["y"],
                                [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])], opset)  # fmt: skip
    relu = helper.make_function("torch.nn.modules.activation", "ReLU", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])], opset)
    calls = [helper.make_node("Conv2d", ["x", "W"], ["c"], domain="torch.nn.modules.conv", name="conv")]
    order = (("ReLU", "activation", "c", "a", "relu"), ("BatchNorm2d", "batchnorm", "a", "y", "bn"))
    if not relu_first:
        order = (("BatchNorm2d", "batchnorm", "c", "a", "bn"), ("ReLU", "activation", "a", "y", "relu"))
    for op, module, source, target, name in order:
        inputs = [source, "s", "b", "m", "v"] if op == "BatchNorm2d" else [source]
        calls.append(helper.make_node(op, inputs, [target], domain=f"torch.nn.modules.{module}", name=name))
    block_opsets = [*opset, *(helper.make_opsetid(f"torch.nn.modules.{module}", 1) for module in ("conv", "batchnorm", "activation"))]
    block = helper.make_function("__main__", "Block", ["x", "W", "s", "b", "m", "v"], ["y"], calls, block_opsets)
    graph = helper.make_graph(
        [helper.make_node("Block", ["input", "W", "scale", "bias", "mean", "var"], ["output"], domain="__main__", name="block")],
        "nested", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, 8, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[*block_opsets, helper.make_opsetid("__main__", 1)], functions=[conv, norm, relu, block])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_batchnorm_nested_in_functions_beside_a_conv_function_folds():
    """The BatchNorm function was inlined into Block alone (0 of 0 folded, and Block then used a domain it does
    not import: onnxruntime refused the output); the Conv its own function left it no neighbour. The functions
    holding layers or BatchNorms, and those calling them, are inlined; the ReLU stays a function."""
    model = _nested_functions_model(relu_first=False)
    folded, report = fold_onnx(model)
    assert len(report.folds) == 1 and report.folds[0].layer_op == "Conv" and op_count(folded, "BatchNormalization") == 0
    assert report.verification.passed and [check.status for check in report.verification.folds] == ["passed"]
    assert [function.name for function in folded.functions] == ["ReLU"]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded, atol=1e-5, rtol=1e-4)


def test_inlined_functions_are_verified_even_when_nothing_folds():
    model = _nested_functions_model(relu_first=True)
    folded, report = fold_onnx(model)
    assert report.folds == [] and [skip.code for skip in report.skips] == ["no-foldable-neighbour"]
    assert report.verification is not None and report.verification.passed
    onnx.checker.check_model(folded, full_check=True)


def test_a_batchnorm_in_an_if_branch_inside_a_function_folds():
    """The function was not inlined (its BatchNorm is in a branch, not among its own nodes): "folded 0 of 0",
    while `bnfold check` said it would fold."""
    channels = 4
    inits = _function_model_initializers(channels)
    branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y_then"], name="bn")],
        "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)],
    )  # fmt: skip
    otherwise = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y_else"], pads=[1, 1, 1, 1])], "else", [],
                                  [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])  # fmt: skip
    opset = [helper.make_opsetid("", 17)]
    function = helper.make_function("local", "Branchy", ["x", "W", "s", "b", "m", "v", "flag"], ["y"],
                                    [helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=otherwise)], opset)  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Branchy", ["input", "W", "scale", "bias", "mean", "var", "flag"], ["output"], domain="local", name="call")],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, 8, 8])],
        [*inits, numpy_helper.from_array(np.array(True), "flag")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[*opset, helper.make_opsetid("local", 1)], functions=[function])
    model.ir_version = 8
    folded, report = fold_onnx(model)
    assert [(fold.batchnorm, fold.graph) for fold in report.folds] == [("bn", "then")] and report.verification.passed
    assert_same_outputs(model, folded, atol=1e-5, rtol=1e-4)


def test_a_failed_shape_inference_prints_no_traceback(tmp_path):
    """onnx_ir's shape inference (a model with external data loads through onnx_ir) logs its failure with a whole
    traceback, which reached stderr."""
    nodes = [helper.make_node("Add", ["x", "odd"], ["d"]), helper.make_node("MatMul", ["d", "w"], ["y"])]
    inits = [initializer("odd", np.ones([3, 5], np.float32)), initializer("w", np.ones([5, 2], np.float32))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    completed = subprocess.run([Path(sys.executable).with_name("bnfold"), path, "--dry-run"], capture_output=True, text=True)
    assert "Traceback" not in completed.stderr and completed.stderr.count("\n") <= 1, completed.stderr


def test_shapes_inferred_for_the_analysis_stay_out_of_the_folded_model(tmp_path):
    """A MatMul fold needs the data's rank, so the model's shapes are inferred; what the folded model declares
    stays what the original declared: onnx's inference gives a SplitToSequence's parts one symbolic size
    (LeViT exported by dynamo), which onnxruntime then held them to and failed."""
    r = np.random.default_rng(0)
    inits = [initializer("W", r.normal(size=(12, 12)).astype(np.float32)), *batchnorm_parameters(12, "bn", r),
             initializer("sizes", np.array([4, 8], np.int64)), initializer("first", np.array(0, np.int64))]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), batchnorm_node("h", "y", "bn"),
             helper.make_node("SplitToSequence", ["y", "sizes"], ["parts"], axis=1, name="split"),
             helper.make_node("SequenceAt", ["parts", "first"], ["z"], name="at")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])], inits,
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 12])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "sequence.onnx"
    onnx.save(model, path)
    for source in (model, path):
        folded, report = fold_onnx(source)
        folded = folded if isinstance(folded, onnx.ModelProto) else ir.to_proto(folded)
        assert [fold.batchnorm for fold in report.folds] == ["bn"] and report.verification.passed
        declared = {info.name for info in folded.graph.value_info}
        assert "h" in declared and "parts" not in declared  # (the fold's own new values aside)


def test_a_reader_of_the_batchnorms_type_alone_does_not_keep_it():
    """torch.onnx's dynamo exporter makes a bias-less Conv's zero bias as Expand(CastLike(0, x)), x the Conv's
    input: CastLike reads x's type, not its values, so BatchNorm -> Conv still folds into the Conv."""
    r = np.random.default_rng(0)
    inits = [*batchnorm_parameters(8, "bn", r), initializer("W", r.normal(size=(4, 8, 1, 1)).astype(np.float32)),
             initializer("zero", np.array(0, np.int64)), initializer("channels", np.array([4], np.int64))]  # fmt: skip
    nodes = [batchnorm_node("x", "y", "bn"), helper.make_node("CastLike", ["zero", "y"], ["zero_like"], name="cast"),
             helper.make_node("Expand", ["zero_like", "channels"], ["bias"], name="expand"),
             helper.make_node("Conv", ["y", "W", "bias"], ["z"], name="conv")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 6, 6])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4, 6, 6])], inits,
                              value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 6, 6])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    folded, report = fold_onnx(model)
    assert [(fold.layer, fold.direction) for fold in report.folds] == [("conv", "into-following")] and report.verification.passed
    assert op_count(folded, "BatchNormalization") == 0
    assert_same_outputs(model, folded, **F32)


def test_a_function_nothing_calls_is_neither_inlined_nor_named(tmp_path):
    """The note named an uncalled function holding a BatchNorm as inlined; `bnfold verify` of a function model
    against itself said "no node is labelled 'node_...'" (a name inlining makes) instead of the BatchNorm kept."""
    from click.testing import CliRunner

    from bnfold.cli import main

    model = _nested_functions_model(relu_first=False)
    spare = onnx.FunctionProto()
    spare.CopyFrom(next(function for function in model.functions if function.name == "BatchNorm2d"))
    spare.name = "Unused"
    model.functions.append(spare)
    folded, report = fold_onnx(model)
    assert len(report.folds) == 1 and "Unused" not in " ".join(report.notes)
    assert sorted(function.name for function in folded.functions) == ["ReLU", "Unused"]
    onnx.save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx")])
    assert result.exit_code == 0 and "the folded model keeps" in result.output


def _concatenated_convs(read_elsewhere: bool = False, with_input: bool = False) -> onnx.ModelProto:
    """MixNet's MixedConv2d as exported: Split -> three Convs of their own kernel size -> Concat(axis=1) -> BN -> Relu."""
    rng = np.random.default_rng(0)
    initializers = [initializer("splits", np.array([4, 4, 4], np.int64)), *batchnorm_parameters(13 if with_input else 12, "bn", rng)]
    nodes = [helper.make_node("Split", ["x", "splits"], ["s0", "s1", "s2"], axis=1)]
    for index, kernel in enumerate((3, 5, 7)):
        initializers.append(initializer(f"w{index}", rng.normal(0, 0.3, (4, 1, kernel, kernel)).astype(np.float32)))
        nodes.append(helper.make_node("Conv", [f"s{index}", f"w{index}"], [f"c{index}"], group=4, pads=[kernel // 2] * 4, name=f"conv{index}"))
    pieces = ["c0", "c1", "c2"] + (["first"] if with_input else [])
    if with_input:
        nodes.append(helper.make_node("Slice", ["x", "zero", "one", "one_axis"], ["first"]))
        initializers += [initializer("zero", np.array([0], np.int64)), initializer("one", np.array([1], np.int64)), initializer("one_axis", np.array([1], np.int64))]
    nodes += [helper.make_node("Concat", pieces, ["joined"], axis=-3), batchnorm_node("joined", "normalised", "bn"), helper.make_node("Relu", ["normalised"], ["y"])]
    outputs = ["y", "joined"] if read_elsewhere else ["y"]
    return make_model(nodes, [("x", ["N", 12, 9, 9])], outputs, initializers)


def test_a_batchnorm_after_a_concat_of_convs_folds_a_part_into_each():
    """MixNet exports (timm mixnet_s: 15 of 49 BatchNorms folded): each channel after the Concat comes from one conv,
    which takes its part of the BatchNorm."""
    model = _concatenated_convs()
    folded, report = fold_onnx(model)

    assert op_count(folded, "BatchNormalization") == 0 and op_count(folded, "Concat") == 1 and not report.skips
    assert [(fold.layer, fold.channels) for fold in report.folds] == [("conv0", [0, 4]), ("conv1", [4, 8]), ("conv2", [8, 12])]
    assert report.format_text().splitlines()[1].startswith("  folded 1 of 1 BatchNorm(s); nodes 7 -> 6")
    checks = report.verification.folds
    assert [check.status for check in checks] == ["passed"] * 3 and all("a part of a BatchNorm after a Concat" in check.reason for check in checks)
    assert_same_outputs(model, folded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("read_elsewhere", "with_input", "code"), [(True, False, "layer-output-shared"), (False, True, "no-foldable-neighbour")])
def test_a_concat_read_elsewhere_or_of_other_values_keeps_its_batchnorm(read_elsewhere, with_input, code):
    folded, report = fold_onnx(_concatenated_convs(read_elsewhere, with_input))
    assert not report.folds and [skip.code for skip in report.skips] == [code] and "Concat" in report.skips[0].reason
    assert op_count(folded, "BatchNormalization") == 1


def test_a_wrong_part_of_a_concat_fold_fails_verification(tmp_path):
    from bnfold.onnx_fold.verify import verify

    model = _concatenated_convs()
    folded, report = fold_onnx(model, verify=False)
    weight = next(node for node in folded.graph.node if node.name == "conv1").input[1]
    tensor = next(t for t in folded.graph.initializer if t.name == weight)
    array = numpy_helper.to_array(tensor).copy()
    array[2] *= 1 + 1e-3
    tensor.CopyFrom(numpy_helper.from_array(array, weight))
    (check,) = [check for check in verify(model, folded, folds=report.folds).folds if check.status == "failed"]
    assert check.fold.startswith("bn [BatchNormalization] (channels 4-7) into preceding conv1") and check.parameters.channel == 2
