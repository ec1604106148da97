"""The trained fixtures carry realistic statistics, export with their BatchNorms, and fold in ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx_models import assert_same_outputs, fast_path_agrees, op_count
from torch import nn

from bnfold import fold_onnx
from bnfold.testing import FIXTURES, example_input, export_onnx, trained_fixture


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def trained(request):
    return request.param, trained_fixture(request.param)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_fixture_is_a_torch_model_in_eval_mode_with_trained_statistics(trained):
    name, model = trained
    layers = batchnorms(model)
    assert len(layers) == FIXTURES[name].batchnorms
    assert not model.training
    for layer in layers:
        assert type(layer).__module__.startswith("torch.nn")  # weights moved into torch's own layers
        assert int(layer.num_batches_tracked) == 20
        # Far from PyTorch's initial mean 0 / var 1 / gamma 1 / beta 0 in every layer.
        assert layer.running_mean.abs().mean() > 0.05
        assert (layer.running_var - 1).abs().mean() > 0.05
        assert (layer.weight - 1).abs().mean() > 0.02
        assert layer.bias.abs().mean() > 0.02


def test_fixture_training_is_deterministic():
    first, second = trained_fixture("mlp"), trained_fixture("mlp")
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_fixture_export_keeps_batchnorms_and_folds_them_all(trained, tmp_path):
    name, model = trained
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, example_input(name), path)
    original = onnx.load(path)
    assert op_count(original, "BatchNormalization") == FIXTURES[name].batchnorms
    # Plain Conv/ConvTranspose/Gemm pairs are folded on the protobuf; the mlp's bias-less Linear exports
    # as a MatMul on a Transpose of the weight, which takes the pass.
    assert fast_path_agrees(original) == (name != "mlp")
    folded, report = fold_onnx(original)
    assert op_count(folded, "BatchNormalization") == 0
    assert len(report.folds) == FIXTURES[name].batchnorms and report.skips == []
    assert report.verification.passed
    assert_same_outputs(original, folded, atol=1e-5, rtol=1e-4)


def test_training_mode_export_marks_batchnorms(tmp_path):
    model = trained_fixture("small_cnn").train()
    path = tmp_path / "train.onnx"
    export_onnx(model, example_input("small_cnn"), path, training=True)
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"]
    assert len(nodes) == 4
    assert all(any(a.name == "training_mode" and a.i == 1 for a in n.attribute) for n in nodes)


def test_bundled_example_is_the_regenerated_fixture(tmp_path):
    from pathlib import Path

    bundled = Path(__file__).parent.parent / "examples" / "small_cnn.onnx"
    assert bundled.stat().st_size < 2_000_000
    export_onnx(trained_fixture("small_cnn"), example_input("small_cnn"), tmp_path / "again.onnx")
    fresh = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "again.onnx").graph.initializer}
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(bundled).graph.initializer}
    assert fresh.keys() == stored.keys()
    for key in fresh:
        np.testing.assert_allclose(fresh[key], stored[key], atol=1e-6, rtol=1e-5, err_msg=key)


def test_dynamo_export_without_optimisation_folds_through_computed_zero_biases(tmp_path):
    """torch.onnx.export(dynamo=True, optimize=False) writes each absent conv bias as
    Shape/Expand/CastLike of a zero: those are evaluated as constants and removed once unread."""
    path = tmp_path / "dynamo.onnx"
    model = trained_fixture("small_cnn")
    torch.onnx.export(model, (example_input("small_cnn"),), path, dynamo=True, optimize=False, verbose=False)
    original = onnx.load(path)
    assert op_count(original, "BatchNormalization") == 4 and op_count(original, "Expand") == 6
    folded, report = fold_onnx(original)
    assert op_count(folded, "BatchNormalization") == 0
    assert op_count(folded, "Expand") == op_count(folded, "CastLike") == op_count(folded, "Shape") == 0
    assert report.verification.passed
    assert_same_outputs(original, folded, atol=1e-5, rtol=1e-4)
