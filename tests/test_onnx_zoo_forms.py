"""ONNX forms that model zoos and converters other than torch's leave behind (issue 15): IR version < 4
models whose initializers are graph inputs.

Outputs are compared with the original in onnxruntime (optimisations off): float32 atol 1e-5 / rtol 1e-4
on hand-built single-layer models.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx_models import assert_same_outputs, batchnorm_node, batchnorm_parameters, fast_path_agrees, initializer, op_count

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
