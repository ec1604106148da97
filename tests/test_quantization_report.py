"""The quantization figures in the fold report, on a real model with one near-dead channel: the trained
small CNN whose last BatchNorm (`down.1`) has running variance 1e-6 in channel 5, through fold_onnx,
bnfold.fold, the CLI's JSON and text reports and `bnfold check`."""

from __future__ import annotations

import copy
import functools
import json
import math
import runpy
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import bnfold
from bnfold.checks import check_model, check_onnx
from bnfold.cli import main
from bnfold.fold_math import WeightLayout
from bnfold.quantization import measure_fold, named_channels
from bnfold.testing import example_input, export_onnx, trained_fixture

DEAD = 5
BATCHNORMS = [
    "/stem/stem.1/BatchNormalization",
    "/block/bn1/BatchNormalization",
    "/block/bn2/BatchNormalization",
    "/down/down.1/BatchNormalization",
]


@functools.cache
def _trained():
    return trained_fixture("small_cnn")


def near_dead_model(variance: float = 1e-6, gamma: float | None = None) -> torch.nn.Module:
    model = copy.deepcopy(_trained())
    with torch.no_grad():
        model.down[1].running_var[DEAD] = variance
        if gamma is not None:
            model.down[1].weight[DEAD] = gamma
    return model


@pytest.fixture
def onnx_path(tmp_path):
    path = tmp_path / "near_dead.onnx"
    export_onnx(near_dead_model(), example_input("small_cnn"), path)
    return path


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(tensor)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    (found,) = [n for n in model.graph.node if n.name == name]
    return found


def test_fold_onnx_flags_the_layer_of_the_near_dead_channel(onnx_path):
    folded, report = bnfold.fold_onnx(str(onnx_path), quantization=True)
    assert [layer.batchnorm for layer in report.quantization] == BATCHNORMS
    assert [layer.flags for layer in report.quantization] == [[], [], [], ["int8"]]
    down = report.quantization[3]
    assert (down.layer, down.direction, down.graph) == ("/down/down.0/Conv", "into-preceding", "")
    # The figures are those of the layer's weights, read from the files here.
    original, written = onnx.load(onnx_path), ir.to_proto(folded)
    conv, batchnorm = node(original, "/down/down.0/Conv"), node(original, "/down/down.1/BatchNormalization")
    gamma, beta, mean, var = (initializer(original, name) for name in batchnorm.input[1:])
    eps = onnx.helper.get_attribute_value(batchnorm.attribute[0])
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    expected = measure_fold(
        initializer(original, conv.input[1]),
        initializer(written, node(written, "/down/down.0/Conv").input[1]),
        WeightLayout("conv"),
        named_channels(scale, gamma, mean, var, eps),
        batchnorm=batchnorm.name, layer=conv.name,
    )  # fmt: skip
    assert down == expected
    # The near-dead channel stretches the range ~300x: per-tensor int8 drops from ~44 dB to nothing, per-channel keeps it.
    assert down.channels[0].channel == DEAD and down.channels[0].variance == pytest.approx(1e-6)
    assert down.channel_spread_before < 1.5 < 100 < down.channel_spread_after
    assert down.int8_per_tensor_db_before > 40 and down.int8_db_lost > 30 and down.int8_per_channel_db > 40


def test_pytorch_front_end_gives_the_same_figures(onnx_path):
    model = near_dead_model()
    result = bnfold.fold(model, example_input("small_cnn"), quantization=True)
    _, onnx_report = bnfold.fold_onnx(str(onnx_path), verify=False, quantization=True)
    assert [layer.layer for layer in result.report.quantization] == ["stem.0", "block.conv1", "block.conv2", "down.0"]
    assert [layer.flags for layer in result.report.quantization] == [[], [], [], ["int8"]]
    # Same weights, same fold algebra; ONNX stores eps as float32 (1e-5 -> 9.99999975e-06), so a few weights may
    # round differently.
    for torch_layer, onnx_layer in zip(result.report.quantization, onnx_report.quantization):
        assert torch_layer.range_before == onnx_layer.range_before
        assert torch_layer.int8_per_tensor_db == pytest.approx(onnx_layer.int8_per_tensor_db, abs=0.01)
        assert torch_layer.int8_per_channel_db == pytest.approx(onnx_layer.int8_per_channel_db, abs=0.01)
        assert [c.channel for c in torch_layer.channels] == [c.channel for c in onnx_layer.channels]


def test_float16_target_flags_the_overflowing_fold():
    # γ 1000 on a variance of 0: the channel's weights times 1000 / sqrt(1e-5) = 3.2e5, past float16's 65504.
    model = near_dead_model(variance=0.0, gamma=1000.0)
    report = bnfold.fold(model, example_input("small_cnn"), target_dtype="float16", verify=False).report
    down = report.quantization[3]
    # Evaluated in float16, the overflowing folded weights are infinitely worse than the unfolded layer.
    assert down.flags == ["int8", "float16", "float16-error"] and down.target.error.folded_error == math.inf
    low, high = down.range_after
    assert down.target.largest >= max(-low, high) > 65504  # the largest of the folded weight and bias
    assert down.target.overflow > 0 and down.target.overflow_before == 0
    assert [layer.target.lossy for layer in report.quantization[:3]] == [False] * 3
    with pytest.raises(ValueError, match="'float32' is not one of float16, bfloat16"):
        bnfold.fold(model, example_input("small_cnn"), target_dtype="float32")


def test_cli_json_has_every_fold_and_text_only_the_flagged_one(onnx_path, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, [str(onnx_path), "--dry-run", "--format", "json", "--target-dtype", "float16"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["schema"] == "bnfold.fold-report/6"
    entries = report["quantization"]
    assert [entry["batchnorm"] for entry in entries] == BATCHNORMS
    assert [entry["flags"] for entry in entries] == [[], [], [], ["int8"]]
    down = entries[3]
    assert down["channels"][0]["channel"] == DEAD and down["int8_per_tensor_db_lost"] > 30
    assert down["target_dtype"]["dtype"] == "float16" and down["target_dtype"]["overflow"] == 0
    text = runner.invoke(main, [str(onnx_path), "--dry-run", "--quantization"]).output
    table = [line for line in text.splitlines() if "quantization" in line or " | " in line]
    assert table[0] == (
        "  quantization: 1 of 4 folded layer(s) flagged (per-tensor int8 loses > 12 dB through the fold, or the target "
        "dtype overflows or gets > 1% more values below its normal range, or evaluating in it errs > 2x more than unfolded)"
    )
    assert table[2].startswith("    /down/down.0/Conv | ") and f"| {DEAD}: " in table[2]
    assert len(table) == 3
    # Off by default: it reads every weight several times.
    assert json.loads(runner.invoke(main, [str(onnx_path), "--dry-run", "--format", "json"]).output)["quantization"] == []
    refused = runner.invoke(main, [str(onnx_path), "--dry-run", "--target-dtype", "int8"])
    assert refused.exit_code == 2 and "'int8' is not one of 'float16', 'bfloat16'" in refused.output


def test_check_warns_before_folding(onnx_path):
    findings = [finding for finding in check_onnx(onnx_path, measure_batch=False) if finding.code == "BN007"]
    assert [finding.name for finding in findings] == ["/down/down.1/BatchNormalization"]
    assert findings[0].severity == "warning"
    # Measured on the Conv's weights, since the check folds the ONNX model.
    assert "folded into /down/down.0/Conv, per-tensor int8 SQNR" in findings[0].message
    assert f"channels {DEAD} (scale" in findings[0].message
    # A PyTorch model is estimated from the statistics: max/median of |γ|/sqrt(var+eps).
    model = near_dead_model()
    (estimated,) = [finding for finding in check_model(model, measure_batch=False) if finding.code == "BN007"]
    bn = model.down[1]
    scale = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).abs().detach().numpy()
    lost = 20 * np.log10(scale.max() / np.median(scale))
    assert estimated.name == "down.1" and f"lose about {lost:.1f} dB" in estimated.message
    assert f"channel {DEAD}: scale" in estimated.message
    # With example inputs the pairs are found as bnfold.fold finds them, and the fold measured on the weights,
    # in training mode too (its statistics fold the same).
    measured = bnfold.fold(model, example_input("small_cnn"), target_dtype="float16", verify=False).report.quantization[3]
    for mode in (model.eval(), model.train()):
        (finding,) = [f for f in check_model(mode, example_input("small_cnn"), measure_batch=False) if f.code == "BN007"]
        assert finding.name == "down.1" and finding.message.startswith(
            f"folded into down.0, per-tensor int8 SQNR {measured.int8_per_tensor_db_before:.1f} -> "
            f"{measured.int8_per_tensor_db:.1f} dB ({measured.int8_db_lost:.1f} dB lost"
        )
    assert model.training  # (the check left the model as it was given)
    result = CliRunner().invoke(main, ["check", str(onnx_path), "--select", "BN007"])
    assert result.exit_code == 0 and " BN007 warning " in result.output


def test_worked_example_prints_the_warning_and_the_flagged_layer(capsys):
    example = runpy.run_path(str(Path(__file__).parent.parent / "examples" / "near_dead_channel.py"), run_name="example")
    example["main"]()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bnfold check: BN007 down.1: folded into down.0, per-tensor int8 SQNR 43.7 -> 0.0 dB")
    assert any(line.startswith("    down.0 | 43.7 -> 0.0 | 45.1 | 282 | 5: 241 (γ 0.8, var 1e-06, eps 1e-05)") for line in lines)


def test_weights_int8_holds_exactly_lose_nothing_and_the_json_stays_strict(tmp_path):
    """Ternary weights quantize exactly (inf dB before the fold): the folded ones' 50-odd dB are no loss to flag,
    and the report's inf is the string "inf", JSON having no infinity (strict parsers refused /3's Infinity)."""
    from onnx import TensorProto, helper

    channels, rng = 8, np.random.default_rng(1)
    weight = rng.integers(-1, 2, (channels, 3, 3, 3)).astype(np.float32)
    statistics = {"g": rng.uniform(0.8, 1.2, channels), "b": rng.normal(0, 0.1, channels),
                  "m": rng.normal(0, 0.1, channels), "v": rng.uniform(0.8, 1.2, channels)}  # fmt: skip
    inits = [numpy_helper.from_array(weight, "W")] + [numpy_helper.from_array(v.astype(np.float32), k) for k, v in statistics.items()]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="layer", pads=[1] * 4),
         helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"], name="bn")],
        "ternary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, channels, 6, 6])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "ternary.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(main, [str(path), "--dry-run", "--quantization", "--format", "json"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output, parse_constant=lambda constant: pytest.fail(f"non-standard JSON {constant}"))["quantization"]
    assert entry["int8_per_tensor_sqnr_db_before"] == "inf" and entry["flags"] == []
    assert 40 < entry["int8_per_tensor_sqnr_db"] < 60 and entry["int8_per_tensor_db_lost"] < 0
