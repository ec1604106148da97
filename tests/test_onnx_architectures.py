"""Real architectures at their published size (bnfold.architectures), exported from PyTorch with the
BatchNorms kept: every BatchNorm that follows a Conv folds, the rest are left with reasons, the folded
models pass the full ONNX checker and verify in onnxruntime (float32, atol 1e-5, rtol 1e-4)."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx_models import assert_same_outputs, fast_path_agrees, op_count
from torch_architectures import CASES, trained_eval_model

from bnfold import fold_onnx
from bnfold.architectures import ARCHITECTURES, realistic_model
from bnfold.testing import export_onnx
from bnfold.verification import LOCAL_UNITS

# BatchNorms bnfold must leave, with their skip code. DenseNet-121's pre-activation BN→ReLU→Conv layers
# read a Concat and feed a ReLU: nothing can absorb them (62 of its 121).
LEFT = {"resnet50": 0, "mobilenet_v2": 0, "shufflenet_v2": 0, "densenet121": 62}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def exported(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    export_onnx(realistic_model(name), torch.randn(1, 3, 64, 64), path)  # 64x64 keeps onnxruntime quick
    return name, onnx.load(path)


def test_architecture_folds_every_batchnorm_after_a_conv(exported):
    name, original = exported
    total = ARCHITECTURES[name].batchnorms
    assert op_count(original, "BatchNormalization") == total
    # Only plain Conv->BN pairs: the protobuf fast path takes the model, with the pass's result.
    assert fast_path_agrees(original) == (LEFT[name] == 0)
    folded, report = fold_onnx(original)
    onnx.checker.check_model(folded, full_check=True)
    assert op_count(folded, "BatchNormalization") == LEFT[name]
    assert len(report.folds) == total - LEFT[name]
    assert all(f.direction == "into-preceding" and f.layer_op == "Conv" for f in report.folds)
    assert [s.code for s in report.skips] == ["no-foldable-neighbour"] * LEFT[name]
    assert all("Concat" in s.reason and "Relu" in s.reason for s in report.skips)
    assert report.verification.passed
    # Every fold is also checked on its own (bnfold.verification.LOCAL_UNITS), well inside its bound.
    assert len(report.verification.folds) == len(report.folds)
    assert all(check.status == "passed" and check.units < LOCAL_UNITS["float32"] / 2 for check in report.verification.folds)
    # ... and its parameters are those of the exact fold, rounded once (bnfold.verification.PARAMETER_UNITS).
    assert max(check.parameters.units for check in report.verification.folds) <= 0.5
    assert_same_outputs(original, folded, atol=1e-5, rtol=1e-4)


def test_densenet_style_transition_batchnorm_folds_forward(tmp_path):
    """The small DenseNet-style net's transition is BN → unpadded 1x1 Conv (no ReLU between)."""
    model, inputs = trained_eval_model(next(case for case in CASES if case.name == "densenet"))
    export_onnx(model, inputs[0], tmp_path / "densenet.onnx")
    original = onnx.load(tmp_path / "densenet.onnx")
    folded, report = fold_onnx(original)
    forward = [f for f in report.folds if f.direction == "into-following"]
    assert [f.batchnorm for f in forward] == ["/transition/norm/BatchNormalization"]
    assert op_count(folded, "BatchNormalization") == 5
    assert_same_outputs(original, folded, atol=1e-5, rtol=1e-4)
