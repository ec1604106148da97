"""Real architectures exported from PyTorch: every BatchNorm that follows a Conv folds, the rest are
left with reasons, and the folded models verify in onnxruntime (float32, atol 1e-5, rtol 1e-4)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from bnfold import fold_onnx
from bnfold.testing import export_onnx
from onnx_models import assert_same_outputs, op_count
from torch_architectures import CASES, conv_bn_act, trained_eval_model


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split (or duplicate when striding), 1x1 / depthwise 3x3 / 1x1, concat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        branch_in = cin if stride > 1 else cin // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                *conv_bn_act(cin, half, 1),
            )  # fmt: skip
        self.branch2 = nn.Sequential(
            *conv_bn_act(branch_in, half, 1),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            *conv_bn_act(half, half, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat((left, self.branch2(right)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = conv_bn_act(3, 8, 3, 2)
        self.stages = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1), ShuffleUnit(16, 32, 2))
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


ARCHITECTURES = {case.name: case for case in CASES if case.name in ("resnet", "mobilenet_v2", "densenet")}


def exported(name: str, tmp_path) -> onnx.ModelProto:
    if name == "shufflenet_v2":
        torch.manual_seed(0)
        model, inputs = ShuffleNetV2().eval(), (torch.randn(2, 3, 32, 32),)
        with torch.no_grad():  # trained-looking statistics
            for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.running_mean.normal_().mul_(0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_().mul_(0.3)
    else:
        model, inputs = trained_eval_model(ARCHITECTURES[name])
    export_onnx(model, inputs[0], tmp_path / f"{name}.onnx")
    return onnx.load(tmp_path / f"{name}.onnx")


# (BatchNorms in the export, BatchNorms bnfold must leave, the skip codes of those left)
EXPECTED = {
    "resnet": (6, 0, []),
    "mobilenet_v2": (11, 0, []),
    "shufflenet_v2": (14, 0, []),
    # norm1 of each dense layer and norm5 sit after a Concat / before a ReLU: pre-activation, nothing to absorb
    "densenet": (11, 5, ["no-foldable-neighbour"] * 5),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_architecture_folds_every_batchnorm_next_to_a_conv(name, tmp_path):
    original = exported(name, tmp_path)
    total, left, codes = EXPECTED[name]
    assert op_count(original, "BatchNormalization") == total
    folded, report = fold_onnx(original)
    onnx.checker.check_model(folded, full_check=True)
    assert op_count(folded, "BatchNormalization") == left
    assert sorted(s.code for s in report.skips) == codes
    assert len(report.folds) == total - left
    assert report.verification.passed
    assert_same_outputs(original, folded, atol=1e-5, rtol=1e-4)


def test_densenet_transition_batchnorm_folds_forward(tmp_path):
    folded, report = fold_onnx(exported("densenet", tmp_path))
    forward = [f for f in report.folds if f.direction == "into-following"]
    assert [f.batchnorm for f in forward] == ["/transition/norm/BatchNormalization"]
    assert all("Concat" in s.reason or "Relu" in s.reason for s in report.skips)
