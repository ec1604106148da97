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
        assert layer.running_mean.abs().mean() > 0.02
        assert (layer.running_var - 1).abs().mean() > 0.02
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


def test_bundled_example_is_a_trained_small_cnn_with_the_fixture_structure(tmp_path):
    """What the bundled example must be, not bit-equality with a retrain (training differs in the last bits
    from CPU to CPU): the structure a fresh export has, and trained statistics in every BatchNorm."""
    from pathlib import Path

    bundled = onnx.load(Path(__file__).parent.parent / "examples" / "small_cnn.onnx")
    export_onnx(trained_fixture("small_cnn"), example_input("small_cnn"), tmp_path / "again.onnx")
    fresh = onnx.load(tmp_path / "again.onnx")
    assert [n.op_type for n in bundled.graph.node] == [n.op_type for n in fresh.graph.node]
    assert [n.input for n in bundled.graph.node] == [n.input for n in fresh.graph.node]

    def layout(model):
        return {i.name: (i.data_type, tuple(i.dims)) for i in model.graph.initializer}

    assert layout(bundled) == layout(fresh)
    values = {i.name: onnx.numpy_helper.to_array(i) for i in bundled.graph.initializer}
    batchnorms = [n for n in bundled.graph.node if n.op_type == "BatchNormalization"]
    assert len(batchnorms) == 4
    for node in batchnorms:
        scale, bias, mean, var = (values[name] for name in node.input[1:])
        assert np.abs(mean).mean() > 0.02 and np.abs(var - 1).mean() > 0.02, node.name
        assert np.abs(scale - 1).mean() > 0.02 and np.abs(bias).mean() > 0.02, node.name
    folded, report = fold_onnx(bundled)
    assert len(report.folds) == 4 and report.verification.passed


def test_float64_fixture_training_is_stable_under_last_bit_noise():
    """Fixture training is reproducible across CPUs where it matters: a perturbation of the initial weights
    by float32's last bit (what differing kernels amount to) moves the trained float32 weights by far less
    than the tolerances the tests use."""
    from bnfold import reference
    from bnfold.testing import FIXTURES, _reproducible_training, train_steps

    spec = FIXTURES["small_cnn"]

    def train(perturb: bool) -> dict[str, torch.Tensor]:
        with _reproducible_training():
            torch.manual_seed(0)
            model = spec.build(reference)
            if perturb:
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.mul_(1 + 2.0**-24)
            train_steps(model, spec.input_shape, 20, 0)
        return {k: v.float() for k, v in model.state_dict().items()}

    plain, perturbed = train(False), train(True)
    for key in plain:
        torch.testing.assert_close(perturbed[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)


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
