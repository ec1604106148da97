"""ONNX forms that model zoos and converters other than torch's leave behind (issue 15): IR version < 4
models whose initializers are graph inputs.

Outputs are compared with the original in onnxruntime (optimisations off): float32 atol 1e-5 / rtol 1e-4
on hand-built single-layer models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
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
from bnfold.cli import main

F32 = dict(atol=1e-5, rtol=1e-4)


def ir3_conv_bn() -> onnx.ModelProto:
    """Conv -> BatchNorm as IR version 3 models store it: every initializer is also a graph input."""
    r = np.random.default_rng(0)
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), batchnorm_node("y", "z", "bn")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def test_ir3_initializer_inputs_are_refused_naming_the_option():
    model = ir3_conv_bn()
    assert not fast_path_agrees(model)
    result, report = fold_onnx(model)
    assert [s.code for s in report.skips] == ["parameters-not-constant"] and not report.folds
    reason = report.skips[0].reason
    assert "graph input 'bn_scale'" in reason and "IR version < 4" in reason
    assert "freeze_initializer_inputs=True" in reason and "--freeze-initializer-inputs" in reason
    assert [v.name for v in result.graph.input] == [v.name for v in model.graph.input]


def test_freezing_initializer_inputs_folds_and_names_them():
    model = ir3_conv_bn()
    result, report = fold_onnx(model, freeze_initializer_inputs=True)
    assert len(report.folds) == 1 and not report.skips
    assert op_count(result, "BatchNormalization") == 0 and op_count(result, "Conv") == 1
    assert [v.name for v in result.graph.input] == ["x"]
    assert result.ir_version == 4 and model.ir_version == 3
    onnx.checker.check_model(result)
    frozen = "froze 5 initializer-backed graph input(s), no longer inputs of the model: W, bn_scale, bn_bias, bn_mean, bn_var"
    assert report.notes == [frozen, "IR version 3 -> 4, the first that allows initializers that are not inputs"]
    # Verification fed only x; the original ran on its stored defaults for the rest.
    assert report.verification.passed and report.verification.inputs == {"x": [1, 4, 6, 6]}
    assert_same_outputs(model, result, **F32)


def test_freezing_leaves_a_modern_model_alone():
    model = ir3_conv_bn()
    del model.graph.input[1:]
    model.ir_version = 8
    assert fast_path_agrees(model)
    _, report = fold_onnx(model, freeze_initializer_inputs=True)
    assert len(report.folds) == 1 and report.notes == []


def test_cli_option_freezes(tmp_path):
    path, out = tmp_path / "ir3.onnx", tmp_path / "folded.onnx"
    onnx.save(ir3_conv_bn(), path)
    refused = CliRunner().invoke(main, [str(path), "--dry-run", "--format", "json"], catch_exceptions=False)
    assert refused.exit_code == 0 and "--freeze-initializer-inputs" in json.loads(refused.output)["skips"][0]["reason"]
    done = CliRunner().invoke(main, [str(path), "-o", str(out), "--freeze-initializer-inputs", "--format", "json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert len(report["folds"]) == 1 and report["notes"][0].startswith("froze 5 initializer-backed graph input(s)")
    assert [v.name for v in onnx.load(out).graph.input] == ["x"]


# Item 2: weights and BatchNorm parameters computed by constant subgraphs.

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def computed_weights_conv_bn(range_limit: float = 216.0) -> onnx.ModelProto:
    """Conv -> BatchNorm whose weight is Reshape(Range * 0.01) and whose variance is Exp(Tile(...)): ops
    beyond the exporter patterns."""
    r = np.random.default_rng(0)
    scale, bias, mean, _ = batchnorm_parameters(6, "bn", r)
    nodes = [
        helper.make_node("Range", ["start", "limit", "delta"], ["ramp"]),
        helper.make_node("Slice", ["ramp", "zero", "count"], ["ramp216"]),
        helper.make_node("Sin", ["ramp216"], ["wave"]),
        helper.make_node("Reshape", ["wave", "wshape"], ["W"]),
        helper.make_node("Tile", ["var_seed", "repeats"], ["tiled"]),
        helper.make_node("Exp", ["tiled"], ["bn_var"]),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        batchnorm_node("y", "z", "bn"),
    ]
    inits = [
        initializer("start", np.float32(0)), initializer("limit", np.float32(range_limit)), initializer("delta", np.float32(1)),
        initializer("zero", np.array([0])), initializer("count", np.array([216])), initializer("wshape", np.array([6, 4, 3, 3])),
        initializer("var_seed", np.array([0.1, -0.2, 0.3], np.float32)), initializer("repeats", np.array([2])),
        scale, bias, mean,
    ]  # fmt: skip
    return make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits)


def test_weights_from_constant_subgraphs_fold_and_the_report_names_them():
    model = computed_weights_conv_bn()
    assert not fast_path_agrees(model)
    result, report = fold_onnx(model)
    assert len(report.folds) == 1 and not report.skips
    assert [n.op_type for n in result.graph.node] == ["Conv"]
    assert report.notes == [
        "evaluated 6 constant node(s) computing folded weights or parameters, and removed them: "
        "Exp x1, Range x1, Reshape x1, Sin x1, Slice x1, Tile x1"
    ]
    assert_same_outputs(model, result, **F32)


def test_a_computed_tensor_past_the_cap_is_left_with_a_reason():
    # Range over 2**24 + 2 floats: 64 MiB of float32 and 8 bytes, refused before it is made.
    model = computed_weights_conv_bn(range_limit=float(2**24 + 2))
    result, report = fold_onnx(model)
    assert [s.code for s in report.skips] == ["weight-not-constant"] and not report.folds
    assert "Range would take 64.0 MiB, past the 64 MiB cap on evaluated tensors" in report.skips[0].reason
    assert len(result.graph.node) == len(model.graph.node)


def light_model(name: str) -> onnx.ModelProto:
    return onnx.load(LIGHT / f"light_{name}.onnx")


@pytest.mark.parametrize(
    "name,batchnorms,folded_batchnorms,evaluated",
    [("resnet50", 53, 53, 237), ("shufflenet", 49, 49, 241), ("inception_v2", 69, 69, 543), ("densenet121", 121, 59, 525)],
)
def test_light_model_zoo_networks_fold_once_frozen(name, batchnorms, folded_batchnorms, evaluated):
    """The onnx package's light model-zoo networks: IR version 3 (initializers are inputs), weights built by
    ConstantOfShape. Without the option nothing folds (the issue's 0 of 292); with it every BatchNorm after
    a Conv folds (densenet's other 62 are pre-activation: Concat/MaxPool -> BN -> Mul -> Add -> Relu)."""
    model = light_model(name)
    assert op_count(model, "BatchNormalization") == batchnorms and model.ir_version == 3
    _, refused = fold_onnx(model, verify=False)
    assert not refused.folds and {s.code for s in refused.skips} == {"parameters-not-constant"}
    assert all("--freeze-initializer-inputs" in s.reason for s in refused.skips)
    assert not fast_path_agrees(model)
    result, report = fold_onnx(model, verify=False, freeze_initializer_inputs=True)
    assert sum(f.batchnorm_op == "BatchNormalization" for f in report.folds) == folded_batchnorms
    assert op_count(result, "BatchNormalization") == batchnorms - folded_batchnorms
    assert {s.code for s in report.skips} <= {"no-foldable-neighbour"}
    assert f"evaluated {evaluated} constant node(s)" in report.notes[2]
    onnx.checker.check_model(result)
    assert_same_outputs(model, result, atol=1e-5, rtol=1e-4)


# Item 4: BatchNorm next to an inference-mode Dropout or an Identity.


def dropout(x: str, y: str, opset: int, name: str = "drop", training: str | None = None, mask: bool = False, **attributes):
    inputs = [x] if training is None else [x, "ratio", training]
    outputs = [y, "mask"] if mask else [y]
    return helper.make_node("Dropout", inputs, outputs, name=name, **attributes)


def layer_passthrough_bn(passthroughs, opset: int = 13, extra_inits=(), outputs=("z",)) -> onnx.ModelProto:
    """Conv -> passthroughs -> BatchNorm; ``passthroughs`` are nodes from "y" to "p"."""
    r = np.random.default_rng(0)
    inits = [initializer("W", r.normal(size=[6, 4, 3, 3]).astype(np.float32)), *batchnorm_parameters(6, "bn", r), *extra_inits]
    bn_attributes = {"is_test": 1} if opset < 7 else {}
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), *passthroughs, batchnorm_node("p", "z", "bn", **bn_attributes)]
    return make_model(nodes, [("x", [1, 4, 6, 6])], list(outputs), inits, opset=opset)


TRAINING_OFF = [initializer("ratio", np.float32(0.5)), initializer("off", np.array(False))]


@pytest.mark.parametrize(
    "opset,passthroughs,extra",
    [
        (13, [helper.make_node("Identity", ["y"], ["p"], name="id")], ()),
        (7, [dropout("y", "p", 7)], ()),
        (10, [dropout("y", "p", 10)], ()),
        (13, [helper.make_node("Identity", ["y"], ["q"], name="id"), dropout("q", "p", 13, training="off")], TRAINING_OFF),
        (13, [dropout("y", "p", 13, mask=True)], ()),  # the mask is declared but unread
    ],
    ids=["identity", "dropout7", "dropout10", "identity-dropout13-training-off", "dropout13-unread-mask"],
)
def test_batchnorm_folds_back_through_inference_passthroughs(opset, passthroughs, extra):
    model = layer_passthrough_bn(passthroughs, opset, extra)
    assert not fast_path_agrees(model)
    result, report = fold_onnx(model)
    assert [(f.batchnorm, f.layer, f.direction) for f in report.folds] == [("bn", "conv", "into-preceding")]
    assert op_count(result, "BatchNormalization") == 0
    assert [n.op_type for n in result.graph.node] == ["Conv", *[n.op_type for n in passthroughs]]
    through = ", ".join(f"{n.name} [{n.op_type}]" for n in passthroughs)
    assert report.notes == [f"bn folded through {through}, left in place (the identity at inference)"]
    assert report.verification.passed
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize(
    "opset,passthroughs,extra,outputs",
    [
        (6, [dropout("y", "p", 6)], (), ("z",)),  # is_test=0: training mode
        (13, [dropout("y", "p", 13, training="on")], [initializer("ratio", np.float32(0.5)), initializer("on", np.array(True))], ("z",)),
        (13, [dropout("y", "p", 13, mask=True), helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT)], (), ("z", "m")),
        (13, [helper.make_node("Identity", ["y"], ["p"], name="id")], (), ("z", "p")),  # read elsewhere
    ],
    ids=["dropout6-training", "dropout13-training-on", "dropout13-mask-read", "identity-output-read"],
)
def test_batchnorm_does_not_fold_through_an_active_or_read_passthrough(opset, passthroughs, extra, outputs):
    model = layer_passthrough_bn(passthroughs, opset, extra, outputs)
    fast_path_agrees(model)
    result, report = fold_onnx(model, verify=False)
    assert not report.folds and [s.code for s in report.skips] == ["no-foldable-neighbour"]
    assert f"its input comes from {passthroughs[0].op_type}" in report.skips[0].reason
    assert op_count(result, "BatchNormalization") == 1


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("passthrough", ["Identity", "Dropout"])
def test_batchnorm_folds_forward_through_a_passthrough(op, passthrough):
    r = np.random.default_rng(0)
    inits = [*batchnorm_parameters(5, "bn", r), initializer("W", r.normal(size=[5, 3]).astype(np.float32))]
    nodes = [batchnorm_node("x", "n", "bn"), helper.make_node(passthrough, ["n"], ["p"], name="pass"), helper.make_node(op, ["p", "W"], ["z"], name="layer")]
    model = make_model(nodes, [("x", [2, 5])], ["z"], inits)
    assert not fast_path_agrees(model)
    result, report = fold_onnx(model)
    assert [(f.batchnorm, f.layer, f.direction) for f in report.folds] == [("bn", "layer", "into-following")]
    assert [n.op_type for n in result.graph.node] == [passthrough, op, *(["Add"] if op == "MatMul" else [])]
    assert report.notes == [f"bn folded through pass [{passthrough}], left in place (the identity at inference)"]
    assert_same_outputs(model, result, **F32)
