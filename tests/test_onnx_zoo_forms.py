"""ONNX forms that model zoos and converters other than torch's leave behind (issue 15): IR version < 4
models whose initializers are graph inputs, weights computed by constant subgraphs, Identity/Dropout between
layer and BatchNorm, a BatchNorm behind a layout op (LeViT's LinearNorm), and QDQ (quantized weight) models.

Outputs are compared with the original in onnxruntime (optimisations off): float32 atol 1e-5 / rtol 1e-4
on hand-built single-layer models.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnx_models import (
    assert_same_outputs,
    batchnorm_node,
    batchnorm_parameters,
    fast_path_agrees,
    initializer,
    make_model,
    op_count,
    run,
)

from bnfold import fold_onnx
from bnfold.architectures import randomize_batchnorm_statistics
from bnfold.cli import main
from bnfold.testing import export_onnx
from bnfold.zoo_forms import LEVIT_INPUT_SHAPE, LinearNorm, levit_style_model

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


def test_ir3_model_with_constant_node_parameters_folds_into_a_valid_model():
    # Constant nodes are constants in any IR version, but the folded parameters are initializers, which
    # before IR version 4 had to be graph inputs: the folded model failed onnx's checker (and bnfold's load).
    model = ir3_conv_bn()
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer] + list(model.graph.node)
    del model.graph.node[:], model.graph.initializer[:], model.graph.input[1:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    result, report = fold_onnx(model)
    assert len(report.folds) == 1 and report.verification.passed
    onnx.checker.check_model(result)
    assert result.ir_version == 4 and [v.name for v in result.graph.input] == ["x"]
    assert report.notes[-1].startswith("IR version 3 -> 4, the first that allows initializers that are not inputs; ")
    assert_same_outputs(model, result, **F32)


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


@pytest.mark.parametrize("op", ["MaxPool", "ScatterND"])
def test_a_weight_computed_by_an_op_no_exporter_uses_is_not_evaluated(op):
    """onnx's reference evaluator loops over these in Python: a 568-byte model's MaxPool of a 9 MB constant held the
    fold 57 s, a ScatterND 79 s. Exporters compute weights with no such op: the weight is left as computed at run time."""
    r = np.random.default_rng(0)
    ones = helper.make_node("ConstantOfShape", ["image_shape"], ["image"], value=numpy_helper.from_array(np.array([1.0], np.float32)))
    if op == "MaxPool":
        computed = [helper.make_node("MaxPool", ["image"], ["pooled"], kernel_shape=[3, 3])]
    else:
        computed = [helper.make_node("ScatterND", ["image", "where", "values"], ["pooled"])]
    nodes = [
        ones,
        *computed,
        helper.make_node("Slice", ["pooled", "start", "end", "axes"], ["cut"]),
        helper.make_node("Reshape", ["cut", "wshape"], ["W"]),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        batchnorm_node("y", "z", "bn"),
    ]
    inits = [
        initializer("image_shape", np.array([1, 1, 200, 200])), initializer("start", np.array([0])), initializer("end", np.array([216])),
        initializer("axes", np.array([3])), initializer("wshape", np.array([6, 4, 3, 3])), *batchnorm_parameters(6, "bn", r),
        initializer("where", np.array([[0, 0, 0, 3]])), initializer("values", np.array([2.0], np.float32)),
    ]  # fmt: skip
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits)
    result, report = fold_onnx(model)
    assert [s.code for s in report.skips] == ["weight-not-constant"] and not report.folds
    assert f"computed at run time (by {op})" in report.skips[0].reason


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


# Item 3: a BatchNorm whose channel axis a layout op brings from a MatMul's feature axis (LeViT's LinearNorm).


class LinearNormWithBias(torch.nn.Module):
    """timm's LinearNorm (bnfold.zoo_forms.LinearNorm) with a biased Linear: MatMul -> Add -> Flatten -> BN."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 6)
        self.bn = torch.nn.BatchNorm1d(6)

    forward = LinearNorm.forward


@pytest.mark.parametrize("module", [lambda: LinearNorm(8, 6), LinearNormWithBias], ids=["linear-norm", "linear-norm-bias"])
def test_levit_linear_norm_export_folds_into_the_matmul(module, tmp_path):
    torch.manual_seed(0)
    model = module().eval()
    randomize_batchnorm_statistics(model, torch.Generator().manual_seed(0))
    export_onnx(model, torch.randn(2, 5, 8), tmp_path / "linear_norm.onnx")
    original = onnx.load(tmp_path / "linear_norm.onnx")
    assert [n.op_type for n in original.graph.node if n.op_type not in ("Identity", "Transpose")] == [
        "MatMul", *(["Add"] if isinstance(model, LinearNormWithBias) else []), "Flatten", "BatchNormalization", "Shape", "Reshape"
    ]  # (the export reads the MatMul's shape for reshape_as: a reader of its shape alone)
    assert not fast_path_agrees(original)
    result, report = fold_onnx(original)
    assert [(f.batchnorm, f.layer, f.layer_op, f.direction) for f in report.folds] == [
        ("/bn/BatchNormalization", "/linear/MatMul", "MatMul", "into-preceding")
    ]
    assert report.notes[0] == (
        "/bn/BatchNormalization folded through /Flatten [Flatten], left in place: Flatten keeps /linear/MatMul's output "
        "features whole on the BatchNorm's channel axis"
    )
    assert [n.op_type for n in result.graph.node] == ["MatMul", "Add", "Flatten", "Shape", "Reshape"]
    assert report.verification.passed
    onnx.checker.check_model(result, full_check=True)
    assert_same_outputs(original, result, **F32)
    # The same with torch's batch of 1 fed by onnxruntime: symbolic batch, the Flatten still proves the axis.
    torch.testing.assert_close(torch.from_numpy(run(result, {"input": np.ones([2, 5, 8], np.float32)})[0]), model(torch.ones(2, 5, 8)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_levit_style_network_folds_every_batchnorm(tmp_path, opset):
    """Conv stem, LinearNorm attention and MLP blocks on [B, N, C] tokens, BatchNorm1d -> Linear head. Before
    opset 14 the exporter computes the Reshape targets (Concat of Shape slices), for which onnx infers no shape:
    the ranks are derived (see bnfold.onnx_fold.derived_shapes)."""
    model = levit_style_model()
    export_onnx(model, torch.randn(1, *LEVIT_INPUT_SHAPE), tmp_path / "levit.onnx", opset=opset)
    original = onnx.load(tmp_path / "levit.onnx")
    assert op_count(original, "BatchNormalization") == model.batchnorms == 13
    assert not fast_path_agrees(original)
    result, report = fold_onnx(original)
    assert op_count(result, "BatchNormalization") == 0 and not report.skips
    layers = collections.Counter((f.layer_op, f.direction) for f in report.folds)
    assert layers == {("Conv", "into-preceding"): 4, ("MatMul", "into-preceding"): 8, ("Gemm", "into-following"): 1}
    assert sum("Flatten keeps" in note for note in report.notes) == 8
    assert report.verification.passed
    assert_same_outputs(original, result, atol=1e-5, rtol=1e-4)
    assert len(result.graph.value_info) == len(original.graph.value_info)  # the derived shapes served the analysis only


def test_derived_shapes_follow_the_ops_semantics():
    """Reshape to a computed target of 3 entries, an elementwise op broadcasting it, a Transpose, a MatMul, a
    Reshape to Shape(y): the dimensions each op fixes, None where they depend on values."""
    import onnx_ir as ir

    from bnfold.onnx_fold.derived_shapes import derive_missing_shapes

    nodes = [
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "W"], ["mm"]),
        helper.make_node("Shape", ["mm"], ["s"], start=1),
        helper.make_node("Reshape", ["y", "s"], ["y2"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]), helper.make_tensor_value_info("target", TensorProto.INT64, [3]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones([1, 7, 1], np.float32), "scale"), numpy_helper.from_array(np.ones([7, 4], np.float32), "W")],
    )  # fmt: skip
    model = ir.from_proto(helper.make_model(graph))
    derive_missing_shapes(model.graph)
    values = {node.outputs[0].name: node.outputs[0] for node in model.graph}
    dims = {name: [d if isinstance(d, int) else None for d in value.shape] for name, value in values.items() if value.shape is not None}
    assert dims == {"r": [None, None, None], "m": [None, 7, None], "t": [None, None, 7], "mm": [None, None, 4], "y2": [None, 4]}


def matmul_layout_bn(layout_nodes, bn_channels: int = 6, bias: bool = False, inits=(), back: bool = False) -> onnx.ModelProto:
    """x [2, 5, 8] @ W [8, 6] (+ b) -> layout nodes from "m" to "f" -> BatchNorm -> "z" (with ``back``, -> a
    Reshape back to [2, 5, 6] -> "z")."""
    r = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm" if bias else "m"], name="matmul")]
    weights = [initializer("W", r.normal(size=[8, 6]).astype(np.float32)), *batchnorm_parameters(bn_channels, "bn", r), *inits]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["m"], name="bias"))
        weights.append(initializer("b", r.normal(size=[6]).astype(np.float32)))
    if not back:
        return make_model([*nodes, *layout_nodes, batchnorm_node("f", "z", "bn")], [("x", [2, 5, 8])], ["z"], weights)
    restore, restore_shape = reshape("n", "z", [2, 5, 6], "back")
    nodes += [*layout_nodes, batchnorm_node("f", "n", "bn"), restore]
    return make_model(nodes, [("x", [2, 5, 8])], ["z"], [*weights, restore_shape])


def reshape(x: str, y: str, shape: list[int], name: str = "reshape") -> tuple[onnx.NodeProto, onnx.TensorProto]:
    return helper.make_node("Reshape", [x, f"{name}_shape"], [y], name=name), initializer(f"{name}_shape", np.array(shape, np.int64))


@pytest.mark.parametrize("target,bias", [([-1, 6], False), ([10, 6], True)], ids=["minus-one", "static-with-bias"])
def test_matmul_reshape_batchnorm_reshape_folds(target, bias):
    """Hand-built: the BatchNorm between a Reshape to [B*N, C] and one back to [B, N, C]."""
    into, into_shape = reshape("m", "f", target)
    model = matmul_layout_bn([into], bias=bias, inits=[into_shape], back=True)
    assert not fast_path_agrees(model)
    result, report = fold_onnx(model)
    assert [(f.layer, f.direction) for f in report.folds] == [("matmul", "into-preceding")]
    assert [n.op_type for n in result.graph.node] == ["MatMul", "Add", "Reshape", "Reshape"]
    assert "bn folded through reshape [Reshape], left in place: Reshape keeps matmul's output features whole" in report.notes[0]
    assert_same_outputs(model, result, **F32)


def test_matmul_transpose_batchnorm_folds():
    """[B, N, C] -> Transpose(0, 2, 1) -> BatchNorm1d on [B, C, N]: axis 1 is the MatMul's feature axis."""
    model = matmul_layout_bn([helper.make_node("Transpose", ["m"], ["f"], name="transpose", perm=[0, 2, 1])])
    result, report = fold_onnx(model)
    assert len(report.folds) == 1 and op_count(result, "Transpose") == 1
    assert "Transpose keeps matmul's output features whole" in report.notes[0]
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize(
    "layout,bn_channels,expected",
    [
        (reshape("m", "f", [2, 30]), 30, "Reshape puts 30 values on the BatchNorm's channel axis, not the 6 output features of matmul alone (it mixes them with other axes); only a reshape to [-1, 6] keeps them whole"),
        (reshape("m", "f", [20, 3]), 3, "Reshape puts 3 values on the BatchNorm's channel axis, not the 6 output features"),
        ((helper.make_node("Flatten", ["m"], ["f"], name="flatten", axis=1), None), 30, "Flatten puts 30 values"),
        (reshape("m", "f", [10, 3, 2]), 3, "Reshape gives matmul's output a 3-D shape; only a reshape to [-1, 6]"),
        ((helper.make_node("Transpose", ["m"], ["f"], name="transpose", perm=[1, 0, 2]), None), 2, "Transpose moves axis 0 of matmul's output to the BatchNorm's channel axis, not its feature axis 2"),
    ],
    ids=["features-times-tokens", "features-split", "flatten-axis-1", "three-d", "transpose-batch"],
)
def test_layout_op_that_mixes_the_features_is_refused(layout, bn_channels, expected):
    node, shape = layout
    model = matmul_layout_bn([node], bn_channels, inits=[shape] if shape is not None else [])
    result, report = fold_onnx(model, verify=False)
    assert not report.folds and [s.code for s in report.skips] == ["channel-mismatch"]
    assert f"{node.name}: {expected}" in report.skips[0].reason
    assert op_count(result, "BatchNormalization") == 1


# Item 5: QDQ models, DequantizeLinear(W_q, scale, zero point) -> Conv -> BatchNorm.


def qdq_conv_bn(
    integers: np.ndarray | None = None,
    scale=None,
    zero_point=None,
    axis: int | None = 0,
    bias: str | None = None,
    negative_channels=(),
    opset: int = 17,
    weight_source: str = "initializer",
) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> Conv(DequantizeLinear(integers, scale, zero point)) -> BatchNorm,
    as a quantization toolchain that quantizes before folding leaves it. ``bias``: None, "float" or "int32" (a
    DequantizeLinear with scale input scale x weight scale); ``negative_channels`` get a negative BN scale."""
    r = np.random.default_rng(0)
    integers = r.integers(-127, 128, size=[6, 4, 3, 3]).astype(np.int8) if integers is None else integers
    scale = r.uniform(0.002, 0.02, 6).astype(np.float32) if scale is None else scale
    statistics = batchnorm_parameters(6, "bn", r)
    gamma = numpy_helper.to_array(statistics[0]).copy()
    gamma[list(negative_channels)] *= -1
    statistics[0] = initializer("bn_scale", gamma)
    inits = [initializer("x_scale", np.float32(0.05)), initializer("x_zero", np.uint8(128)), initializer("W_scale", scale), *statistics]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="quantize_x"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dequantize_x"),
    ]
    if weight_source == "fake-quantized":  # QuantizeLinear -> DequantizeLinear of the float weight
        inits.append(initializer("W_float", (integers.astype(np.float32) * scale.reshape(-1, 1, 1, 1))))
        nodes.append(helper.make_node("QuantizeLinear", ["W_float", "W_scale", "W_zero"], ["W_q"], name="quantize_w", axis=0))
    else:
        inits.append(initializer("W_q", integers))
    weight_inputs = ["W_q", "W_scale"]
    if zero_point is not None or weight_source == "fake-quantized":
        inits.append(initializer("W_zero", np.zeros(6, np.int8) if zero_point is None else zero_point))
        weight_inputs.append("W_zero")
    nodes.append(helper.make_node("DequantizeLinear", weight_inputs, ["W"], name="dequantize_w", **({} if axis is None else {"axis": axis})))
    conv_inputs = ["xd", "W"]
    if bias == "float":
        inits.append(initializer("B", r.normal(size=6).astype(np.float32)))
        conv_inputs.append("B")
    elif bias == "int32":
        bias_scale = (np.float32(0.05) * scale).astype(np.float32)
        inits += [initializer("B_q", r.integers(-1000, 1000, 6).astype(np.int32)), initializer("B_scale", bias_scale)]
        nodes.append(helper.make_node("DequantizeLinear", ["B_q", "B_scale"], ["B"], name="dequantize_b", axis=0))
        conv_inputs.append("B")
    nodes += [helper.make_node("Conv", conv_inputs, ["y"], name="conv"), batchnorm_node("y", "z", "bn")]
    return make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits, opset=opset)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def batchnorm_scale(model: onnx.ModelProto) -> np.ndarray:
    values = initializers(model)
    return values["bn_scale"].astype(np.float64) / np.sqrt(values["bn_var"].astype(np.float64) + 1e-5)


def folded_weight(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """The integers, scale and zero point the folded Conv's DequantizeLinear reads, and its axis."""
    (dequantize,) = [n for n in model.graph.node if n.name == "dequantize_w"]
    values = initializers(model)
    axis = next((a.i for a in dequantize.attribute if a.name == "axis"), 1)
    zero = values[dequantize.input[2]] if len(dequantize.input) > 2 else None
    return values[dequantize.input[0]], values[dequantize.input[1]], zero, axis


@pytest.mark.parametrize("bias", [None, "float"])
@pytest.mark.parametrize("zero_point", [None, np.zeros(6, np.int8)], ids=["no-zero-point", "zero-point"])
def test_qdq_per_channel_scales_absorb_the_batchnorm(bias, zero_point):
    model = qdq_conv_bn(bias=bias, zero_point=zero_point)
    assert not fast_path_agrees(model)
    result, report = fold_onnx(model)
    assert [(f.batchnorm, f.layer, f.direction) for f in report.folds] == [("bn", "conv", "into-preceding")]
    assert [n.op_type for n in result.graph.node] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv"]
    integers, scale, zero, axis = folded_weight(result)
    original = initializers(model)
    # The integers are the original's, bit for bit; each scale is scale x s, rounded once to float32.
    assert integers.dtype == np.int8 and np.array_equal(integers, original["W_q"]) and axis == 0
    np.testing.assert_array_equal(scale, (original["W_scale"].astype(np.float64) * batchnorm_scale(model)).astype(np.float32))
    assert (zero is None) == (zero_point is None)
    assert report.notes[0] == (
        "bn folded into the scales of dequantize_w, the quantized weight of conv: its integers unchanged; the bias is "
        "float: runtimes that run QDQ layers as integer kernels want it quantized (int32, scale = input scale x weight scale)"
    )
    assert report.verification.passed
    onnx.checker.check_model(result, full_check=True)
    assert_same_outputs(model, result, **F32)


def test_qdq_weight_whose_shape_is_read_folds():
    """An unoptimised dynamo export reads each Conv weight's Shape; quantized, every BatchNorm was refused: "the
    quantized weight ... is also read elsewhere, which must keep its values". The fold keeps the shape."""
    model = qdq_conv_bn()
    model.graph.node.append(helper.make_node("Shape", ["W"], ["W_shape"], name="weight_shape"))
    model.graph.output.append(helper.make_tensor_value_info("W_shape", TensorProto.INT64, [4]))
    result, report = fold_onnx(model)
    assert len(report.folds) == 1 and not report.skips and report.verification.passed
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize("opset", [13, 19])
def test_qdq_fold_beside_a_batchnorm_left_is_verified_through_the_outputs(opset):
    """A model the onnx_ir pass folds (a pre-activation BatchNorm stays): at opset 19 the check of the QDQ fold read
    the layer's integers as its weight, exit 2 "internal error (ValueError: data type int8 not inexact)"."""
    r = np.random.default_rng(0)
    inits = [
        initializer("W_q", r.integers(-127, 128, size=[6, 3, 3, 3]).astype(np.int8)),
        initializer("W_scale", r.uniform(0.002, 0.02, 6).astype(np.float32)), initializer("W_zero", np.zeros(6, np.int8)),
        *batchnorm_parameters(3, "pre", r), *batchnorm_parameters(6, "bn", r),
    ]  # fmt: skip
    nodes = [
        batchnorm_node("x", "normed", "pre"),
        helper.make_node("Relu", ["normed"], ["active"]),
        helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zero"], ["W"], name="dequantize_w", axis=0),
        helper.make_node("Conv", ["active", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        batchnorm_node("y", "z", "bn"),
    ]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], ["z"], inits, opset=opset)
    result, report = fold_onnx(model)
    assert [fold.batchnorm for fold in report.folds] == ["bn"] and [skip.batchnorm for skip in report.skips] == ["pre"]
    assert report.verification.passed
    assert report.verification.folds[0].status == "not compared" and "reads a quantized weight" in report.verification.folds[0].reason
    assert_same_outputs(model, result, **F32)


def test_qdq_per_tensor_scale_becomes_per_channel():
    model = qdq_conv_bn(scale=np.float32(0.01), zero_point=np.int8(0), axis=None, opset=13)
    result, report = fold_onnx(model)
    integers, scale, zero, axis = folded_weight(result)
    assert np.array_equal(integers, initializers(model)["W_q"]) and axis == 0
    assert scale.shape == (6,) and zero.shape == (6,) and zero.dtype == np.int8 and not zero.any()
    np.testing.assert_array_equal(scale, (np.float64(np.float32(0.01)) * batchnorm_scale(model)).astype(np.float32))
    assert "its per-tensor scale is now per-channel (axis 0)" in report.notes[0]
    assert_same_outputs(model, result, **F32)


def test_qdq_per_tensor_scale_before_opset_13_is_refused():
    model = qdq_conv_bn(scale=np.float32(0.01), axis=None, opset=12)
    result, report = fold_onnx(model, verify=False)
    assert [s.code for s in report.skips] == ["quantized-weight"] and not report.folds
    assert "per-channel scales from opset 13, and the model is opset 12 (convert it with onnx.version_converter first)" in report.skips[0].reason
    assert op_count(result, "BatchNormalization") == 1


@pytest.mark.parametrize(
    "dtype,zero,low,high", [(np.int8, 0, -127, 128), (np.uint8, 100, 0, 201)], ids=["int8-symmetric", "uint8-zero-point-100"]
)
def test_qdq_negative_batchnorm_scale_mirrors_the_integers_exactly(dtype, zero, low, high):
    """A negative BatchNorm scale keeps the quantization scale positive: q' = 2 z - q, exact in range."""
    integers = np.random.default_rng(1).integers(low, high, size=[6, 4, 3, 3]).astype(dtype)
    model = qdq_conv_bn(integers, zero_point=np.full(6, zero, dtype), negative_channels=(1, 4))
    result, report = fold_onnx(model)
    folded, scale, _, _ = folded_weight(result)
    expected = integers.copy()
    expected[[1, 4]] = 2 * zero - integers[[1, 4]].astype(np.int64)
    assert folded.dtype == dtype and np.array_equal(folded, expected) and (scale > 0).all()
    assert "but for 2 channel(s) with a negative BatchNorm scale, mirrored about their zero point" in report.notes[0]
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize(
    "dtype,zero,extreme,expected",
    [
        (np.int8, 0, -128, "mirrored about the zero point (0), and 2 x 0 - (-128) is outside int8's range [-128, 127]"),
        (np.uint8, 128, 0, "mirrored about the zero point (128), and 2 x 128 - (0) is outside uint8's range [0, 255]"),
    ],
)
def test_qdq_negative_scale_that_would_leave_the_integer_range_is_refused(dtype, zero, extreme, expected):
    integers = np.full([6, 4, 3, 3], zero + 1, dtype)
    integers[4, 0, 0, 0] = extreme
    model = qdq_conv_bn(integers, zero_point=np.full(6, zero, dtype), negative_channels=(4,))
    result, report = fold_onnx(model, verify=False)
    assert [s.code for s in report.skips] == ["quantized-weight"]
    reason = report.skips[0].reason
    assert "the BatchNorm's scale is negative in channel 4" in reason and expected in reason
    assert reason.endswith("fold the float model before quantizing it")
    assert op_count(result, "BatchNormalization") == 1 and np.array_equal(folded_weight(result)[0], integers)


@pytest.mark.parametrize(
    "options,expected",
    [
        (dict(bias="int32"), "the bias of conv is quantized (DequantizeLinear, int32 with scale input scale x weight scale)"),
        (dict(weight_source="fake-quantized"), "is fake-quantized (QuantizeLinear -> DequantizeLinear of a float weight)"),
        (dict(axis=1, scale=np.full(4, 0.01, np.float32)), "is quantized per channel along axis 1, but its output channels are on axis 0"),
    ],
    ids=["int32-bias", "fake-quantized", "input-channel-axis"],
)
def test_qdq_forms_that_cannot_absorb_the_batchnorm_exactly_are_refused(options, expected):
    model = qdq_conv_bn(**options)
    before = initializers(model)
    result, report = fold_onnx(model, verify=False)
    assert [s.code for s in report.skips] == ["quantized-weight"] and expected in report.skips[0].reason
    # Nothing was dequantized into a float weight.
    assert [n.op_type for n in result.graph.node] == [n.op_type for n in model.graph.node]
    assert all(np.array_equal(before[name], array) for name, array in initializers(result).items())


@pytest.mark.parametrize(
    "options",
    [dict(scale=np.full(3, 0.01, np.float32)), dict(zero_point=np.zeros(2, np.int8)), dict(scale=np.full([1, 6], 0.01, np.float32))],
    ids=["scale-too-short", "zero-point-too-short", "scale-2d"],
)
def test_qdq_scales_that_do_not_fit_the_weight_are_refused_as_malformed(options):
    # The first two crashed (numpy broadcasting, an internal error on the command line); the third was refused as
    # "quantized per channel along axis 0, but its output channels are on axis 0".
    _, report = fold_onnx(qdq_conv_bn(**options), verify=False)
    assert [s.code for s in report.skips] == ["quantized-weight"]
    assert "for its 6 channels on axis 0 (not a valid DequantizeLinear)" in report.skips[0].reason


def test_batchnorm_before_a_qdq_conv_is_refused():
    """A forward fold scales input channels, which per-output-channel scales cannot express."""
    r = np.random.default_rng(0)
    inits = [*batchnorm_parameters(4, "bn", r), initializer("W_q", r.integers(-127, 128, [6, 4, 1, 1]).astype(np.int8)), initializer("W_scale", np.full(6, 0.01, np.float32))]
    nodes = [
        batchnorm_node("x", "n", "bn"),
        helper.make_node("DequantizeLinear", ["W_q", "W_scale"], ["W"], name="dequantize_w", axis=0),
        helper.make_node("Conv", ["n", "W"], ["z"], name="conv"),
    ]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], ["z"], inits)
    _, report = fold_onnx(model, verify=False)
    assert [s.code for s in report.skips] == ["quantized-weight"]
    assert "a BatchNorm before it scales its input channels, which those scales cannot express" in report.skips[0].reason


def test_qdq_matmul_with_a_bias_add_folds():
    # The bias Add was not recognised (its channels were checked against a constant weight, and a quantized one
    # is not): the Add was "folded" into the MatMul, replaced by a new bias Add, and the BatchNorm left behind it.
    r = np.random.default_rng(0)
    inits = [initializer("W_q", r.integers(-127, 128, [8, 6]).astype(np.int8)), initializer("W_scale", np.array(0.01, np.float32)),
             initializer("b", r.normal(size=6).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]  # fmt: skip
    nodes = [
        helper.make_node("DequantizeLinear", ["W_q", "W_scale"], ["W"], name="dequantize_w"),
        helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b"], ["y"], name="bias"),
        batchnorm_node("y", "z", "bn"),
    ]
    model = make_model(nodes, [("x", [3, 8])], ["z"], inits)
    result, report = fold_onnx(model)
    assert [(f.batchnorm, f.layer) for f in report.folds] == [("bn", "matmul")] and not report.skips
    assert [n.op_type for n in result.graph.node] == ["DequantizeLinear", "MatMul", "Add"]
    assert np.array_equal(folded_weight(result)[0], initializers(model)["W_q"])
    assert_same_outputs(model, result, **F32)


@pytest.mark.parametrize("opset", [12, 17])
def test_qdq_grouped_conv_transpose_is_refused_saying_why(opset):
    # Its output channels lie on no one weight axis; the reason said a per-tensor weight was "quantized per channel
    # along axis None", its output channels "on one group's output channels" (or, before opset 13, to convert the
    # model to an opset with per-channel scales, after which it would be refused all the same).
    r = np.random.default_rng(0)
    inits = [initializer("W_q", r.integers(-127, 128, [4, 3, 2, 2]).astype(np.int8)), initializer("W_scale", np.array(0.01, np.float32)), *batchnorm_parameters(6, "bn", r)]
    nodes = [
        helper.make_node("DequantizeLinear", ["W_q", "W_scale"], ["W"], name="dequantize_w"),
        helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="deconv", group=2),
        batchnorm_node("y", "z", "bn"),
    ]
    _, report = fold_onnx(make_model(nodes, [("x", [1, 4, 3, 3])], ["z"], inits, opset=opset), verify=False)
    assert [s.code for s in report.skips] == ["quantized-weight"]
    assert "is a grouped ConvTranspose's, whose output channels lie on no one weight axis" in report.skips[0].reason
    assert "axis None" not in report.skips[0].reason


def test_qdq_gemm_with_transposed_weight_folds():
    r = np.random.default_rng(0)
    inits = [initializer("W_q", r.integers(-127, 128, [6, 8]).astype(np.int8)), initializer("W_scale", r.uniform(0.01, 0.02, 6).astype(np.float32)), *batchnorm_parameters(6, "bn", r)]
    nodes = [
        helper.make_node("DequantizeLinear", ["W_q", "W_scale"], ["W"], name="dequantize_w", axis=0),
        helper.make_node("Gemm", ["x", "W"], ["y"], name="gemm", transB=1),
        batchnorm_node("y", "z", "bn"),
    ]
    model = make_model(nodes, [("x", [3, 8])], ["z"], inits)
    result, report = fold_onnx(model)
    assert [(f.layer, f.direction) for f in report.folds] == [("gemm", "into-preceding")]
    assert np.array_equal(folded_weight(result)[0], initializers(model)["W_q"])
    assert_same_outputs(model, result, **F32)


def _keras3_batchnorm(data: str, channels: int, shape: list[int], rng, prefix: str = "bn") -> tuple[list, list]:
    """Keras 3's BatchNorm as tf2onnx writes it: ``x * (γ/sqrt(var+eps)) + (β - mean·γ/sqrt(var+eps))``, a Mul
    and an Add by constants of ``shape`` (per channel on one axis)."""
    scale = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    shift = rng.normal(0.0, 1.0, shape).astype(np.float32)
    nodes = [
        helper.make_node("Mul", [data, f"{prefix}_scale"], [f"{prefix}_scaled"], name=f"{prefix}/mul"),
        helper.make_node("Add", [f"{prefix}_scaled", f"{prefix}_shift"], [f"{prefix}_out"], name=f"{prefix}/add"),
    ]
    return nodes, [initializer(f"{prefix}_scale", scale), initializer(f"{prefix}_shift", shift)]


def _nhwc_conv(rng) -> onnx.ModelProto:
    """Keras 3 Conv2D -> BatchNorm (tf2onnx): Conv -> Transpose to NHWC -> Mul [C] -> Add [C]."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        helper.make_node("Transpose", ["y"], ["y_nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
    ]
    bn, constants = _keras3_batchnorm("y_nhwc", 6, [6], rng)
    inits = [initializer("W", rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32)), *constants]
    return make_model(nodes + bn, [("x", [1, 4, 6, 6])], ["bn_out"], inits)


def _conv1d(rng) -> onnx.ModelProto:
    """Keras Conv1D -> BatchNorm (tf2onnx): a 2-D Conv over [N, C, 1, L], Squeeze of axis 2, Mul and Add by [1, C, 1]."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        helper.make_node("Squeeze", ["y", "axes"], ["y_ncl"], name="squeeze"),
    ]
    bn, constants = _keras3_batchnorm("y_ncl", 6, [1, 6, 1], rng)
    inits = [initializer("W", rng.normal(0, 0.3, (6, 4, 1, 3)).astype(np.float32)), initializer("axes", np.array([2])), *constants]
    return make_model(nodes + bn, [("x", [2, 4, 1, 9])], ["bn_out"], inits)


def _dense_on_tokens(rng) -> onnx.ModelProto:
    """Keras Dense on [N, T, K] -> BatchNorm (tf2onnx): Reshape to [-1, K], MatMul, Reshape back to a target computed
    from the input's shape (Concat(Gather(Shape(x), [0, 1]), [C])), Mul and Add by [C]."""
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "batch_axes"], ["batch_dims"]),
        helper.make_node("Concat", ["batch_dims", "features"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "flat"], ["x_flat"]),
        helper.make_node("MatMul", ["x_flat", "W"], ["y_flat"], name="dense"),
        helper.make_node("Reshape", ["y_flat", "target"], ["y"], name="unflatten"),
    ]
    bn, constants = _keras3_batchnorm("y", 8, [8], rng)
    inits = [
        initializer("batch_axes", np.array([0, 1])), initializer("features", np.array([8])), initializer("flat", np.array([-1, 16])),
        initializer("W", rng.normal(0, 0.3, (16, 8)).astype(np.float32)), *constants,
    ]  # fmt: skip
    return make_model(nodes + bn, [("x", ["n", 5, 16])], ["bn_out"], inits)


@pytest.mark.parametrize("build", [_nhwc_conv, _conv1d, _dense_on_tokens], ids=["nhwc-conv", "conv1d", "dense-on-tokens"])
def test_keras3_batchnorm_after_ops_that_move_the_channels_folds(build, tmp_path):
    """tf2onnx writes Keras 3's BatchNorm as a Mul and an Add after a Transpose to NHWC, a Squeeze or a Reshape:
    none folded ("folded 0 of 0", no reason; 34 BatchNorms of MobileNetV3Small). They fold through those ops,
    which stay, each pair checked by the parameters of the map it composes."""
    original = build(np.random.default_rng(0))
    fast_path_agrees(original)
    folded, report = fold_onnx(original)
    assert [fold.batchnorm for fold in report.folds] == ["bn/mul", "bn/add"]
    # (a MatMul's bias is an Add after it: the fold's shift makes one)
    assert op_count(folded, "Mul") == 0 and op_count(folded, "Add") == (build is _dense_on_tokens) and report.verification.passed
    assert [check.status for check in report.verification.folds] == ["passed", "passed"]
    assert "keeps" in report.notes[0] and "whole on the axis its constant scales" in report.notes[0]
    assert_same_outputs(original, folded, **F32)
    # A folded weight 0.2% off in one channel passes the outputs' rtol; the parameters' check does not.
    _assert_verify_catches_one_channel_off(original, folded, 2, 1.002, tmp_path)


def _assert_verify_catches_one_channel_off(original: onnx.ModelProto, folded: onnx.ModelProto, channel: int, scale: float, tmp_path) -> None:
    """`bnfold verify` of ``original`` against ``folded`` with output ``channel`` of its layer's weight times
    ``scale`` (a MatMul's weight is [in, out]) fails, naming that channel."""
    layer = next(node for node in folded.graph.node if node.op_type in ("Conv", "MatMul"))
    wrong = onnx.ModelProto()
    wrong.CopyFrom(folded)
    tensor = next(t for t in wrong.graph.initializer if t.name == layer.input[1])
    array = numpy_helper.to_array(tensor).copy()
    (array[:, channel] if layer.op_type == "MatMul" else array[channel])[...] *= scale
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    onnx.save(original, tmp_path / "original.onnx")
    onnx.save(wrong, tmp_path / "wrong.onnx")
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "original.onnx"), str(tmp_path / "wrong.onnx"), "--format", "json"])
    assert result.exit_code == 1 and f"output channel {channel}" in json.loads(result.stdout)["verification"]["reason"]


@pytest.mark.parametrize("perm,shape", [([0, 2, 3, 1], [6, 1, 1]), ([0, 2, 1, 3], [6])], ids=["constant-on-another-axis", "channels-not-last"])
def test_a_mul_after_a_transpose_on_another_axis_than_the_channels_is_left(perm, shape):
    """After a Transpose to NHWC a constant of shape [6, 1, 1] scales axis 1 (now H), and after perm [0, 2, 1, 3]
    the channels are on axis 2, not the last axis a [6] constant scales: neither is per channel."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), helper.make_node("Transpose", ["y"], ["t"], perm=perm)]
    bn, constants = _keras3_batchnorm("t", 6, shape, rng)
    model = make_model(nodes + bn, [("x", [1, 4, 8, 8])], ["bn_out"], [initializer("W", rng.normal(size=(6, 4, 3, 3)).astype(np.float32)), *constants])
    folded, report = fold_onnx(model)
    assert report.folds == [] and op_count(folded, "Mul") == 1


def test_a_lowered_batchnorm_with_no_layer_to_fold_into_is_named_in_a_note():
    """Keras 3's BatchNorm after a Concat or a pool (DenseNet: 62 of them) is a Mul -> Add that nothing absorbs:
    the report said "folded 0 of 0 BatchNorm(s)" and nothing else."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), helper.make_node("Relu", ["y"], ["r"], name="relu")]
    bn, constants = _keras3_batchnorm("r", 6, [6, 1, 1], rng)
    model = make_model(nodes + bn, [("x", [1, 4, 6, 6])], ["bn_out"], [initializer("W", rng.normal(size=(6, 4, 3, 3)).astype(np.float32)), *constants])
    assert not fast_path_agrees(model)  # (the fast path leaves such models to the pass, which names what it leaves)
    _, report = fold_onnx(model)
    assert report.folds == [] and report.skips == []
    assert (
        "left 1 Mul -> Add pair(s) by constants, the form of a BatchNorm some converters (tf2onnx for Keras 3) write, "
        "with no layer to fold into: bn/mul (its input comes from Relu, not a Conv/ConvTranspose/Gemm/MatMul)"
    ) in report.notes


class _ConvFlattenNorm(torch.nn.Module):
    """A head as face-recognition and metric-learning models end: a conv to [N, C, 1, 1], flatten, BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 5)
        self.norm = torch.nn.BatchNorm1d(6)

    def forward(self, x):
        return self.norm(self.conv(x).flatten(1))


def test_a_batchnorm_after_a_conv_whose_channels_ops_move_back_to_axis_1_folds(tmp_path):
    """Conv -> Flatten -> BatchNorm1d (torch export), and Conv -> Transpose -> Transpose back -> BatchNorm (tf2onnx
    with its own fusion off): refused, "its input comes from Flatten/Transpose". A Transpose that leaves the
    channels on another axis is still refused, saying which."""
    model = _ConvFlattenNorm().eval()
    randomize_batchnorm_statistics(model, torch.Generator().manual_seed(0))
    export_onnx(model, torch.randn(2, 4, 5, 5), tmp_path / "head.onnx")
    original = onnx.load(tmp_path / "head.onnx")
    fast_path_agrees(original)
    folded, report = fold_onnx(original)
    assert len(report.folds) == 1 and op_count(folded, "BatchNormalization") == 0 and report.verification.passed
    assert report.verification.folds[0].status == "passed" and report.verification.folds[0].parameters is not None
    assert_same_outputs(original, folded, **F32)

    rng = np.random.default_rng(0)
    for perms, folds in (([[0, 2, 3, 1], [0, 3, 1, 2]], 1), ([[0, 2, 3, 1]], 0)):
        nodes = [helper.make_node("Conv", ["x", "W"], ["t0"], name="conv")]
        nodes += [helper.make_node("Transpose", [f"t{i}"], [f"t{i + 1}"], perm=perm, name=f"transpose{i}") for i, perm in enumerate(perms)]
        nodes.append(batchnorm_node(f"t{len(perms)}", "z", "bn"))
        channels = 6 if folds else 4  # (axis 1 after NHWC is H, of size 4: a BatchNorm over it is another model)
        inits = [initializer("W", rng.normal(size=(6, 4, 3, 3)).astype(np.float32)), *batchnorm_parameters(channels, "bn", rng)]
        model = make_model(nodes, [("x", [1, 4, 6, 6])], ["z"], inits)
        folded, report = fold_onnx(model)
        assert len(report.folds) == folds
        if folds:
            assert_same_outputs(model, folded, **F32)
        else:
            assert report.skips[0].code == "channel-mismatch"
            assert "Transpose put conv's output channels on axis 3, not the BatchNorm's channel axis 1" in report.skips[0].reason


def _paddle_conv_bias_then(moving: str, rng) -> onnx.ModelProto:
    """paddle2onnx's conv: Conv -> Add (its bias) -> Identity, then the BatchNorm behind ``moving``: BatchNorm1D
    after a flatten (Reshape to Concat(Slice(Shape(x), 0, 1), [-1]), the batch dynamic) or after Conv1D's
    Squeeze of its 2-D conv's height."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="Conv.0"),
        helper.make_node("Add", ["c", "bias"], ["a"], name="Add.0"),
        helper.make_node("Identity", ["a"], ["i"], name="Identity.0"),
    ]
    if moving == "flatten":
        nodes += [
            helper.make_node("Shape", ["i"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "one", "zero"], ["batch"]),
            helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
            helper.make_node("Reshape", ["i", "target"], ["moved"], name="Reshape.0"),
        ]
        shape, kernel = ["n", 4, 5, 5], (6, 4, 5, 5)
    else:
        nodes.append(helper.make_node("Squeeze", ["i", "two"], ["moved"], name="Squeeze.0"))
        shape, kernel = ["n", 4, 1, 9], (6, 4, 1, 3)
    nodes.append(batchnorm_node("moved", "z", "bn"))
    inits = [
        initializer("W", rng.normal(0, 0.3, kernel).astype(np.float32)), initializer("bias", rng.normal(size=(1, 6, 1, 1)).astype(np.float32)),
        initializer("zero", np.array([0])), initializer("one", np.array([1])), initializer("minus_one", np.array([-1])), initializer("two", np.array([2])),
        *batchnorm_parameters(6, "bn", rng),
    ]  # fmt: skip
    return make_model(nodes, [("x", shape)], ["z"], inits)


@pytest.mark.parametrize("moving", ["flatten", "squeeze"])
def test_paddle_conv_bias_add_and_batchnorm_behind_a_reshape_fold_and_are_checked(moving, tmp_path):
    """A dynamic-batch flatten as paddle2onnx writes it was "Reshape spreads the 16 channels over other axes"; and
    the bias Add's fold and the BatchNorm's, into one conv with a Squeeze between them, were checked through the
    outputs only ("BatchNormalization.0 does not read the output of Add.2"): a fold without eps passed verify."""
    original = _paddle_conv_bias_then(moving, np.random.default_rng(0))
    folded, report = fold_onnx(original)
    assert [fold.batchnorm for fold in report.folds] == ["Add.0", "bn"] and report.verification.passed
    assert [check.status for check in report.verification.folds] == ["passed", "passed"]
    assert_same_outputs(original, folded, **F32)
    _assert_verify_catches_one_channel_off(original, folded, 4, 1.001, tmp_path)


def _jax2onnx_inverted_residual() -> onnx.ModelProto:
    """A MobileNet stem and inverted residual as jax2onnx 0.17 exports Flax's NHWC model: Transposes around the
    NCHW Convs, relu6 as Max/Min, and value_info declaring the relu6 values in NHWC ([1, 16, 16, 64]) where they
    are NCHW ([1, 64, 16, 16])."""
    rng = np.random.default_rng(0)
    channels = {"bn0": 16, "bn1": 64, "bn2": 64, "bn3": 16}
    inits = [
        initializer("k0", rng.normal(0, 0.3, [16, 3, 3, 3]).astype(np.float32)),
        initializer("k1", rng.normal(0, 0.3, [64, 16, 1, 1]).astype(np.float32)),
        initializer("k2", rng.normal(0, 0.3, [64, 1, 3, 3]).astype(np.float32)),
        initializer("k3", rng.normal(0, 0.3, [16, 64, 1, 1]).astype(np.float32)),
        initializer("zero", np.array(0, np.float32)),
        initializer("six", np.array(6, np.float32)),
        *(tensor for prefix, size in channels.items() for tensor in batchnorm_parameters(size, prefix, rng)),
    ]
    same = {"auto_pad": "SAME_UPPER"}
    nodes = [
        helper.make_node("Transpose", ["x"], ["t0"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t0", "k0"], ["c0"], strides=[2, 2], **same),
        batchnorm_node("c0", "b0", "bn0"),
        helper.make_node("Transpose", ["b0"], ["o0"], perm=[0, 2, 3, 1]),
        helper.make_node("HardSwish", ["o0"], ["h0"]),
        helper.make_node("Transpose", ["h0"], ["t2"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t2", "k1"], ["c1"], **same),
        batchnorm_node("c1", "b1", "bn1"),
        helper.make_node("Max", ["b1", "zero"], ["relu6_max_0"]),
        helper.make_node("Min", ["relu6_max_0", "six"], ["relu6_out_0"]),
        helper.make_node("Conv", ["relu6_out_0", "k2"], ["c2"], group=64, **same),
        batchnorm_node("c2", "b2", "bn2"),
        helper.make_node("Max", ["b2", "zero"], ["relu6_max_1"]),
        helper.make_node("Min", ["relu6_max_1", "six"], ["relu6_out_1"]),
        helper.make_node("Conv", ["relu6_out_1", "k3"], ["c3"], **same),
        batchnorm_node("c3", "y", "bn3"),
    ]
    model = make_model(nodes, [("x", [1, 32, 32, 3])], ["y"], inits, opset=21)
    nhwc = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 16, 16, 64]) for name in ("relu6_max_0", "relu6_out_0", "relu6_max_1", "relu6_out_1")]
    declared = [value for value in model.graph.value_info if not value.name.startswith("relu6")]
    del model.graph.value_info[:]
    model.graph.value_info.extend([*declared, *nhwc])
    return model


def test_wrong_declared_shapes_of_an_exporter_do_not_fail_the_fold_checks(tmp_path):
    """onnxruntime runs the model as jax2onnx writes it, wrong value_info and all; the fold checks' nodes reading the
    relu6 values made it reuse a buffer of another size ("Shape mismatch attempting to re-use buffer"): exit 2,
    "onnxruntime cannot run the original model". The checks' copy of the original declares no shapes now."""
    model = _jax2onnx_inverted_residual()
    source = tmp_path / "mobilenet.onnx"
    onnx.save(model, source)
    result = CliRunner().invoke(main, [str(source), "-o", str(tmp_path / "folded.onnx"), "--format", "json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["folds"]) == 4 and report["verification"]["passed"]
    assert all(check["status"] == "passed" for check in report["verification"]["folds"])
    assert_same_outputs(model, onnx.load(tmp_path / "folded.onnx"), **F32)


def _dense_on_tokens_then_batchnorm(layer: str, target: list[int], perm: tuple[int, ...] = (0, 2, 1)) -> onnx.ModelProto:
    """jax2onnx's Flax Dense on tokens [B, T, Cin] -> BatchNorm over the features: Reshape to [B*T, Cin] -> Gemm (or
    MatMul + Add) -> Reshape to ``target`` -> Transpose(``perm``) -> BatchNormalization (and Transpose back, left out)."""
    rng = np.random.default_rng(0)
    inits = [
        initializer("W", rng.normal(size=[32, 48]).astype(np.float32)),
        initializer("b", rng.normal(size=[48]).astype(np.float32)),
        initializer("flat", np.array([14, 32], np.int64)),
        initializer("tokens", np.array(target, np.int64)),
        *batchnorm_parameters(target[-1], "bn", rng),
    ]
    if layer == "Gemm":
        dense = [helper.make_node("Gemm", ["x2", "W", "b"], ["d"], name="dense")]
    else:
        dense = [helper.make_node("MatMul", ["x2", "W"], ["m"], name="dense"), helper.make_node("Add", ["m", "b"], ["d"], name="bias")]
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        *dense,
        helper.make_node("Reshape", ["d", "tokens"], ["d3"], name="to_tokens"),
        helper.make_node("Transpose", ["d3"], ["t"], perm=list(perm), name="to_channels"),
        batchnorm_node("t", "y", "bn"),
    ]
    return make_model(nodes, [("x", [2, 7, 32])], ["y"], inits, opset=21)


@pytest.mark.parametrize("layer", ["Gemm", "MatMul"])
def test_dense_on_tokens_batchnorm_folds_through_reshape_and_transpose(layer):
    """It was no-foldable-neighbour ("its input comes from Transpose"): one layout op after a Gemm or MatMul was
    followed, not two."""
    model = _dense_on_tokens_then_batchnorm(layer, [2, 7, 48])
    folded, report = fold_onnx(model)
    assert [fold.layer for fold in report.folds] == ["dense"] and not report.skips
    assert op_count(folded, "BatchNormalization") == 0
    assert report.verification.passed and report.verification.folds[0].status == "passed"
    assert_same_outputs(model, folded, **F32)


def test_dense_on_tokens_reshape_that_splits_the_features_is_refused():
    # [14, 48] -> [2, 7, 2, 24]: the features split over two axes, whatever the Transpose does after.
    model = _dense_on_tokens_then_batchnorm("Gemm", [2, 7, 2, 24], perm=(0, 3, 1, 2))
    folded, report = fold_onnx(model)
    assert not report.folds and [skip.code for skip in report.skips] == ["channel-mismatch"]
