"""The PyTorch front-end on real architectures and on one small model per refusal.

Output tolerances (explicit, relative to the output's scale ``max|original|``, at least 1):
float32 1e-5, float64 1e-12, bfloat16 3e-2 (folded weights are rounded to bfloat16 once). The
worst figures reached over all architectures are 3e-7 (float32), 3e-16 (float64), 6e-3 (bfloat16).
"""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch_architectures import (
    CASES,
    BatchNormAct2d,
    Conv2dSame,
    DynamicConv2dSame,
    FrozenBatchNorm2d,
    LearnableAffineBlock,
    LinearNorm,
    MixedConv2d,
    TfMobileVit,
    TimmGELU,
    TimmSwish,
    ValueBranchNet,
    batchnorm_modules,
    fuse_folds,
    trained_eval_model,
)

from bnfold import fold_math
from bnfold.report import SKIP_CODES
from bnfold.torch_fold import ModelNotTraceableError, calls, fold, rewrite, tracing
from bnfold.verification import VerificationError

RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}


def case_named(name: str):
    return next(case for case in CASES if case.name == name)


def assert_same_outputs(expected, actual) -> None:
    if isinstance(expected, torch.Tensor):
        expected, actual = (expected,), (actual,)
    for e, a in zip(expected, actual, strict=True):
        scale = max(1.0, e.abs().max().item())
        error = (a.double() - e.double()).abs().max().item()
        assert error <= RELATIVE_TOLERANCE[e.dtype] * scale, f"max abs error {error:.3g} at output scale {scale:.3g}"


def outputs(model: nn.Module, inputs: tuple):
    with torch.no_grad():
        return model(*inputs)


def skip_codes(report) -> dict[str, str]:
    return {skip.batchnorm: skip.code for skip in report.skips}


def randomise_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


# --- real architectures ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_folds_real_architecture(case):
    model, inputs = trained_eval_model(case)
    state_before = copy.deepcopy(model.state_dict())
    result = fold(model, inputs)

    assert batchnorm_modules(result.model) == case.batchnorms_left
    assert len(result.report.skips) == case.batchnorms_left
    assert len(result.report.folds) + len(result.report.skips) == batchnorm_modules(model)
    assert result.report.frontend == "pytorch" and result.report.verification.passed
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))
    # The input model is untouched.
    assert batchnorm_modules(model) == batchnorm_modules(case.build())
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in state_before.items())
    for name, parameter in result.model.named_parameters():
        assert isinstance(parameter, nn.Parameter) and parameter.requires_grad, name


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_module_tree_result_keeps_class_and_state_dict_keys(case):
    model, inputs = trained_eval_model(case)
    result = fold(model, inputs)

    assert type(result.model) is type(model)
    folded_batchnorms = {f.batchnorm for f in result.report.folds}
    kept_keys = {k for k in model.state_dict() if k.rpartition(".")[0] not in folded_batchnorms}
    new_keys = set(result.model.state_dict()) - kept_keys
    assert kept_keys <= set(result.model.state_dict())
    assert new_keys == {f"{f.layer}.bias" for f in result.report.folds} - set(model.state_dict())
    for name in folded_batchnorms:
        original, replacement = model.get_submodule(name), result.model.get_submodule(name)
        if isinstance(original, BatchNormAct2d):  # what its forward does after normalising stays
            assert isinstance(replacement, nn.Sequential)
            # An exported graph holds no trace of an nn.Identity child, which has nothing to keep.
            assert [(n, type(m)) for n, m in replacement.named_children() if not isinstance(m, nn.Identity)] == [
                (n, type(m)) for n, m in (("drop", original.drop), ("act", original.act)) if not isinstance(m, nn.Identity)
            ]
        else:
            assert isinstance(replacement, nn.Identity)


def test_layer_subclass_with_own_forward_folds_into_its_module():
    model, inputs = trained_eval_model(case_named("efficientnet"))
    result = fold(model, inputs)

    assert type(result.model) is type(model)
    assert {f.layer_op for f in result.report.folds} == {"Conv2d", "Conv2dSame"}
    # The "same" conv had no bias; its forward convolves with self.bias, where the folded one now is.
    assert isinstance(result.model.stem[0], Conv2dSame) and isinstance(result.model.stem[0].bias, nn.Parameter)
    assert model.stem[0].bias is None
    checks = {check.fold: check.status for check in result.report.verification.folds}
    assert checks["stem.1 [BatchNorm2d] into preceding stem.0 [Conv2dSame]"] == "passed"
    other = (torch.randn(1, 3, 12, 12),)  # the user's forward, at any size
    assert_same_outputs(outputs(model, other), outputs(result.model, other))


class ConvIgnoringBias(nn.Conv2d):
    """A conv subclass whose forward never reads ``self.bias``: a bias registered on it would do nothing."""

    def forward(self, x):
        return F.conv2d(x, self.weight, None, self.stride)


def test_layer_subclass_that_does_not_read_its_bias_folds_in_the_traced_graph():
    model = randomise_statistics(nn.Sequential(ConvIgnoringBias(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert type(result.model).__name__ == "GraphModule"  # not Sequential: it is not the user's class
    assert any("GraphModule instead of the Sequential module tree" in note for note in result.report.notes)
    assert [(f.batchnorm, f.layer_op) for f in result.report.folds] == [("1", "F.conv2d")]
    assert model[0].bias is None  # the input model is unchanged: the probe ran on a copy
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_batchnorm_act_folds_in_the_module_tree_keeping_drop_and_act():
    model, inputs = trained_eval_model(case_named("timm_conv"))
    result = fold(model, inputs)

    assert type(result.model) is type(model)
    assert [(f.batchnorm, f.batchnorm_op, f.layer) for f in result.report.folds] == [
        (f"{block}.bn", "BatchNormAct2d", f"{block}.conv") for block in ("stem", "conv1", "conv2", "head")
    ]
    stem_bn = result.model.stem.bn
    assert isinstance(stem_bn.drop, nn.Dropout) and stem_bn.drop.p == 0.1 and isinstance(stem_bn.act, nn.SiLU)
    assert isinstance(result.model.conv2.bn.act, nn.Identity)  # apply_act=False
    x = torch.randn(2, 3, 8, 8)
    assert_same_outputs(outputs(model.stem, (x,)), outputs(result.model.stem, (x,)))
    # The activation is applied exactly as before: SiLU of the folded conv's output.
    assert torch.equal(outputs(result.model.stem, (x,)), F.silu(outputs(result.model.stem.conv, (x,))))
    # Each fold checked on its own, through the drop and act the module applies after normalising.
    assert [check.status for check in result.report.verification.folds] == ["passed"] * 4
    assert result.report.nodes_before == {"batchnorm": 4, "total": 36}
    assert result.report.nodes_after == {"batchnorm": 0, "total": 32}


@pytest.mark.parametrize("activation", [TimmGELU, TimmSwish])
def test_batchnorm_act_with_an_activation_of_timms_own_folds_in_the_module_tree(activation):
    """timm's own activation modules (not torch's: fx traces through them) inside BatchNormAct2d: the folds went
    into an fx GraphModule, checked through the outputs only (efficientformerv2_s0: 30 of 74)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=activation))
    model = randomise_statistics(model)
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert type(result.model) is nn.Sequential
    assert isinstance(result.model[1], nn.Sequential) and isinstance(result.model[1].act, activation)
    assert [check.status for check in result.report.verification.folds] == ["passed"]
    x = torch.randn(3, 3, 8, 8)
    assert_same_outputs(outputs(model, (x,)), outputs(result.model, (x,)))


class MixNetBlock(nn.Module):
    """timm MixNet's depthwise MixedConv2d then BatchNormAct2d, and a pointwise MixedConv2d then BatchNorm2d."""

    def __init__(self):
        super().__init__()
        self.conv_dw = MixedConv2d(12, 12, [3, 5, 7], depthwise=True)
        self.bn1 = BatchNormAct2d(12, act_layer=nn.SiLU)
        self.conv_pwl = MixedConv2d(12, 10, [1, 1])
        self.bn2 = nn.BatchNorm2d(10)

    def forward(self, x):
        return self.bn2(self.conv_pwl(self.bn1(self.conv_dw(x))))


def test_a_batchnorm_after_a_concatenation_of_convs_folds_a_part_into_each():
    """MixNet's MixedConv2d concatenates the convs of each channel group, then a BatchNorm: each output channel comes
    from one conv, which takes its part of the scale and shift. timm mixnet_s folded 15 of its 49 BatchNorms."""
    model = randomise_statistics(MixNetBlock())
    inputs = (torch.randn(2, 12, 9, 9),)
    result = fold(model, inputs)

    assert type(result.model) is MixNetBlock and not result.report.skips
    assert [(f.batchnorm, f.layer, f.channels) for f in result.report.folds] == [
        ("bn1", "conv_dw.0", [0, 4]), ("bn1", "conv_dw.1", [4, 8]), ("bn1", "conv_dw.2", [8, 12]),
        ("bn2", "conv_pwl.0", [0, 5]), ("bn2", "conv_pwl.1", [5, 10]),
    ]  # fmt: skip
    assert result.report.nodes_before["batchnorm"] == 2 and result.report.nodes_after["batchnorm"] == 0
    assert result.report.format_text().splitlines()[1].startswith("  folded 2 of 2 BatchNorm(s); ")
    assert "bn1 [BatchNormAct2d] (channels 4-7) into preceding conv_dw.1 [Conv2d]" in result.report.format_text()
    assert [check.status for check in result.report.verification.folds] == ["passed"] * 5
    assert isinstance(result.model.bn2, nn.Identity) and isinstance(result.model.bn1.act, nn.SiLU)
    for x in (*inputs, torch.randn(3, 12, 14, 10)):
        assert_same_outputs(outputs(model, (x,)), outputs(result.model, (x,)))


def test_a_concatenation_of_convs_fx_cannot_trace_folds_through_export():
    """tf_mixnet_s: MixedConv2d of TF-"same" convs (math.ceil on the input size: no fx), so torch.export's graph, whose
    concatenation is aten.cat: 49 of 49 folded in timm, as through fx."""

    class TfMixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([DynamicConv2dSame(3, 4, 3, stride=2), DynamicConv2dSame(3, 6, 5, stride=2)])
            self.bn = nn.BatchNorm2d(10)

        def forward(self, x):
            return self.bn(torch.cat([conv(x) for conv in self.convs], 1))

    model = randomise_statistics(TfMixed())
    result = fold(model, (torch.randn(2, 3, 9, 9),))

    assert "torch.export" in result.report.notes[0]
    assert [(f.layer, f.channels) for f in result.report.folds] == [("convs.0", [0, 4]), ("convs.1", [4, 10])]
    assert type(result.model) is TfMixed and isinstance(result.model.bn, nn.Identity)
    x = torch.randn(1, 3, 14, 11)
    assert_same_outputs(outputs(model, (x,)), outputs(result.model, (x,)))


def test_a_wrong_part_of_a_concatenation_fold_fails_its_own_check(monkeypatch):
    """The part of bn2 that conv_pwl.1 takes, off by a relative 1e-3 in one channel: its own check fails."""
    from bnfold.torch_fold import planning

    fold_into_outputs = planning.fold_into_outputs

    def corrupted(weight, bias, affine, layout, out_dtype=None):
        weight, bias = fold_into_outputs(weight, bias, affine, layout, out_dtype)
        if weight.shape[0] == 5 and weight.shape[1] == 6:  # conv_pwl.1 (conv_pwl.0 reads 6 channels too: the second)
            corrupted.calls += 1
            if corrupted.calls == 2:
                weight[3] *= 1 + 1e-3
        return weight, bias

    corrupted.calls = 0
    monkeypatch.setattr(planning, "fold_into_outputs", corrupted)
    with pytest.raises(VerificationError) as caught:
        fold(randomise_statistics(MixNetBlock()), (torch.randn(2, 12, 9, 9),))
    (failed,) = caught.value.verification.failed_folds
    assert failed.fold.startswith("bn2 [BatchNorm2d] (channels 5-9) into preceding conv_pwl.1") and failed.channel == 3


def test_a_concatenation_read_elsewhere_or_of_other_values_stays():
    class Shared(nn.Module):
        def __init__(self, mixed_with_input: bool):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(8)
            self.mixed_with_input = mixed_with_input

        def forward(self, x):
            if self.mixed_with_input:
                return self.bn(torch.cat([self.a(x), x, self.b(x)[:, :1]], 1))
            joined = torch.cat([self.a(x), self.b(x)], 1)
            return self.bn(joined), joined.mean()

    shared = fold(randomise_statistics(Shared(False)), (torch.randn(2, 3, 8, 8),)).report
    assert skip_codes(shared) == {"bn": "layer-output-shared"} and "the concatenation" in shared.skips[0].reason
    mixed = fold(randomise_statistics(Shared(True)), (torch.randn(2, 3, 8, 8),)).report
    assert skip_codes(mixed) == {"bn": "no-foldable-neighbour"} and "is no Conv, ConvTranspose or Linear output" in mixed.skips[0].reason


def test_one_scale_and_bias_for_every_channel_is_no_batchnorm():
    """hgnetv2's LearnableAffineBlock after each activation: timm hgnetv2_b0 was reported "folded 49 of 73
    BatchNorm(s)" for its 42 BatchNorms, its 31 blocks counted among them (24 left as no-foldable-neighbour)."""
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), LearnableAffineBlock(1.5, 0.25)))
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert [(fold.batchnorm, fold.layer) for fold in result.report.folds] == [("1", "0")]
    assert result.report.skips == [] and result.report.nodes_before["batchnorm"] == 1
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_a_child_called_with_more_than_the_normalised_value_is_not_a_kept_child():
    """A BatchNorm subclass calling its own activation as ``self.act(y, 6.0)``: fx traces through the call, and the
    BatchNorm module was replaced by nn.Sequential(act), dropping the 6.0 (13.9 off on inputs past the cap)."""

    class Clip(nn.Module):
        def forward(self, x, limit=None):
            return x if limit is None else x.clamp(max=limit)

    class BatchNormClip(nn.BatchNorm2d):
        def __init__(self, channels):
            super().__init__(channels)
            self.act = Clip()

        def forward(self, x):
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            return self.act(y, 6.0)

    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormClip(8)))
    result = fold(model, (torch.randn(2, 3, 16, 16),))

    assert len(result.report.folds) == 1
    large = 10 * torch.randn(2, 3, 16, 16)
    assert outputs(model, (large,)).max() == 6.0
    assert_same_outputs(outputs(model, (large,)), outputs(result.model, (large,)))


def test_a_child_applied_twice_is_not_a_kept_child():
    """``self.act(self.act(y))`` in a BatchNorm subclass was replaced by nn.Sequential(act=...), holding it once (0.418
    off; behind 40 steps of the logistic map, that passed verification against the model's own float64 distance)."""

    class BatchNormTwice(nn.BatchNorm2d):
        def __init__(self, channels):
            super().__init__(channels)
            self.act = TimmGELU()

        def forward(self, x):
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            return self.act(self.act(y))

    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormTwice(8)))
    result = fold(model, (torch.randn(2, 3, 8, 8),))
    assert len(result.report.folds) == 1
    x = torch.randn(3, 3, 11, 11)
    assert_same_outputs(outputs(model, (x,)), outputs(result.model, (x,)))


def test_a_wrong_replacement_of_a_batchnorm_module_by_its_children_fails_its_check(monkeypatch):
    """The fold's own check compares the layer with the exact map before the children; the children themselves are
    replayed on the module's normalised input against its output: a replacement that drops one fails there."""
    from bnfold.torch_fold import calls

    module_remainder = calls.module_remainder
    monkeypatch.setattr(calls, "module_remainder", lambda *args: (module_remainder(*args) or ())[:1])  # ("drop",): act lost
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=TimmGELU)))
    with pytest.raises(VerificationError) as caught:
        fold(model, (torch.randn(2, 3, 8, 8),))
    (failed,) = caught.value.verification.failed_folds
    assert "`1` replaced by its drop does not compute what the module computes: output" in failed.reason


def test_a_batchnorm_module_whose_forward_branches_on_the_shape_fails_its_check():
    """fx cannot trace ``if x.shape[-1] > 8``; torch.export takes the example's branch, and the BatchNorm was replaced by
    nn.Sequential(act) for every input (1.5 off at width 5). The replacement is now run at other widths too."""

    class ShapeBranch(nn.BatchNorm2d):
        def __init__(self, channels):
            super().__init__(channels)
            self.act = nn.ReLU()

        def forward(self, x):
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            if x.shape[-1] > 8:
                y = self.act(y)
            return y

    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ShapeBranch(8)))
    with pytest.raises(VerificationError) as caught:
        fold(model, (torch.randn(2, 3, 12, 12),))
    (failed,) = caught.value.verification.failed_folds
    assert "`1` replaced by its act does not compute what the module computes on its input reshaped to [2, 8, 12, 6]" in failed.reason


def test_a_wrong_batchnorm_act_fold_fails_its_own_check(monkeypatch):
    """One channel of a BatchNormAct2d fold off by a relative 1e-3: before, such a fold was left to the
    outputs' check, which passes it (one channel's error is below rtol)."""
    from bnfold.torch_fold import planning

    fold_into_outputs = planning.fold_into_outputs

    def corrupted(weight, bias, affine, layout, out_dtype=None):
        weight, bias = fold_into_outputs(weight, bias, affine, layout, out_dtype)
        weight[1] *= 1 + 1e-3
        return weight, bias

    monkeypatch.setattr(planning, "fold_into_outputs", corrupted)
    model, inputs = trained_eval_model(case_named("timm_conv"))
    with pytest.raises(VerificationError) as caught:
        fold(model, inputs)
    failed = caught.value.verification.failed_folds
    assert len(failed) == 4 and all(check.parameters.channel == 1 for check in failed)
    assert all(check.channel == 1 or check.units <= check.allowed_units for check in failed)


def test_batchnorm_act_after_a_same_padding_conv_folds_in_the_module_tree():
    model, inputs = trained_eval_model(case_named("timm_style"))
    result = fold(model, inputs)

    assert type(result.model) is type(model)
    assert [(f.batchnorm, f.batchnorm_op, f.layer_op) for f in result.report.folds] == [
        ("conv_stem.bn", "BatchNormAct2d", "Conv2dSame"),
        ("block1.bn", "BatchNormAct2d", "Conv2d"),
        ("block2.bn", "BatchNormAct2d", "Conv2d"),
        ("conv_head.bn", "BatchNormAct2d", "Conv2dSame"),
    ]
    stem_bn = result.model.conv_stem.bn
    assert isinstance(stem_bn, nn.Sequential) and [type(m) for m in stem_bn] == [nn.Dropout, nn.SiLU]
    assert isinstance(result.model.conv_stem.conv.bias, nn.Parameter)


class FunctionalConvBatchNormAct(nn.Module):
    """A conv as a function call on the model's own kernel, then timm's BatchNormAct2d."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.bn = BatchNormAct2d(4, drop_layer=nn.Dropout)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.kernel, padding=1))


def test_batchnorm_act_after_a_function_call_folds_in_a_graph_not_named_as_the_model():
    model = randomise_statistics(FunctionalConvBatchNormAct())
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert isinstance(result.model, fx.GraphModule) and type(result.model).__name__ == "GraphModule"
    assert [(f.batchnorm, f.batchnorm_op, f.layer_op) for f in result.report.folds] == [("bn", "BatchNormAct2d", "F.conv2d")]
    called = {node.target for node in result.model.graph.nodes if node.op == "call_module"}
    assert {"bn.drop", "bn.act"} <= called and F.batch_norm not in {node.target for node in result.model.graph.nodes}
    # Built from the edited graph: the folded statistics the graph no longer reads are not in the result.
    assert not any(key.startswith("bn.") for key in result.model.state_dict())
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_frozen_batchnorm_folds_in_the_module_tree():
    model, inputs = trained_eval_model(case_named("detection_backbone"))
    result = fold(model, inputs)

    assert type(result.model) is type(model)
    assert {f.batchnorm_op for f in result.report.folds} == {"FrozenBatchNorm2d"} and len(result.report.folds) == 9
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in result.model.modules())
    assert isinstance(result.model.layer1.downsample[1], nn.Identity)
    frozen = {name for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    kept = {key for key in model.state_dict() if key.rpartition(".")[0] not in frozen}
    assert set(result.model.state_dict()) == kept | {f"{f.layer}.bias" for f in result.report.folds}
    # Each FrozenBatchNorm2d took 9 calls (4 reshapes, add, rsqrt, 2 multiplies, subtract) and the multiply-add.
    assert result.report.nodes_before["total"] - result.report.nodes_after["total"] == 9 * 11
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class _TwoFrozen(nn.Module):
    """Two FrozenBatchNorm2d settings (eps) in one model: fx traces the form of each setting once."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), FrozenBatchNorm2d(4, eps=0.5)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4, eps=0.5)

    def forward(self, x):
        return self.bn3(self.conv3(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))


def test_frozen_batchnorms_with_other_settings_fold_with_their_own():
    model, inputs = _frozen(_TwoFrozen()), (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert [f.batchnorm for f in result.report.folds] == ["bn1", "bn2", "bn3"]
    assert [check.status for check in result.report.verification.folds] == ["passed"] * 3
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class _AffineOnlyWhenTraced(nn.Module):
    """Under fx, ``x`` is a proxy: the trace records ``x * scale + shift``, which the module never computes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.register_buffer("shift", torch.ones(4))

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            return x * self.scale.reshape(1, -1, 1, 1)
        return x * self.scale.reshape(1, -1, 1, 1) + self.shift.reshape(1, -1, 1, 1)


def test_a_per_channel_affine_module_that_runs_otherwise_is_caught_by_the_graph_run():
    # Kept as one call for its traced form, it is computed with that form in the graph run: the run shows that
    # the graph is not the model's (and then torch.export's graph folds what the module does compute).
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _AffineOnlyWhenTraced()).eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert any("traced graph computes other outputs than the model" in note for note in result.report.notes)
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def _frozen(module: nn.Module) -> nn.Module:
    torch.manual_seed(2)
    with torch.no_grad():
        for frozen in (m for m in module.modules() if isinstance(m, FrozenBatchNorm2d)):
            for buffer in frozen.buffers():
                buffer.uniform_(0.5, 1.5)
    return module.eval()


class BatchNormThenReLU(nn.BatchNorm2d):
    """Calls torch's forward, which checks the input's rank first: a branch on a proxy to fx."""

    def forward(self, x):
        return F.relu(super().forward(x))


def test_a_batchnorm_subclass_calling_super_forward_is_traced_by_fx_and_folds_in_the_graph():
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormThenReLU(4)))
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert "pairs found with torch.fx symbolic tracing" in result.report.notes
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("1", "0")]
    assert isinstance(result.model, fx.GraphModule)
    assert "_check_input_dim" not in vars(model[1])  # the rank check is the class's again
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class FrozenAfterConv(nn.Module):
    """fx cannot trace the shape branch: torch.export's aten multiply-add folds in the module tree too."""

    def __init__(self, frozen: type[nn.Module] = FrozenBatchNorm2d):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), frozen(4)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return self.bn(self.conv(x))


class FrozenBatchNormReLU(FrozenBatchNorm2d):
    """Also applies F.relu, a function call: the module cannot become a child module, only a graph can fold it."""

    def forward(self, x):
        return F.relu(super().forward(x))


class TracedFrozenAfterConv(FrozenAfterConv):
    def forward(self, x):
        return self.bn(self.conv(x))


def test_frozen_batchnorm_folds_under_torch_export():
    model = _frozen(FrozenAfterConv())
    inputs = (torch.randn(2, 3, 9, 9),)
    result = fold(model, inputs)

    assert type(result.model) is FrozenAfterConv and isinstance(result.model.bn, nn.Identity)
    assert any("torch.export" in note for note in result.report.notes)
    assert [(f.batchnorm, f.batchnorm_op, f.layer) for f in result.report.folds] == [("bn", "FrozenBatchNorm2d", "conv")]
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_frozen_batchnorm_with_more_in_its_forward_folds_in_the_graph():
    model = _frozen(TracedFrozenAfterConv(FrozenBatchNormReLU))
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert type(result.model).__name__ == "GraphModule"
    assert [(f.batchnorm_op, f.layer) for f in result.report.folds] == [("x * scale + shift", "conv")]
    assert F.relu in {node.target for node in result.model.graph.nodes}
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class AffineAfterConv(nn.Module):
    """``conv(x) * scale + shift`` written in forward, with scale and shift of the given kinds."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | float):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("scale", scale)
        self.shift = shift

    def forward(self, x):
        return self.conv(x) * self.scale - self.shift


def test_per_channel_affine_of_buffers_next_to_a_conv_folds_in_the_graph():
    model = AffineAfterConv(torch.rand(4, 1, 1) + 0.5, nn.Parameter(torch.randn(1, 4, 1, 1))).eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert [(f.batchnorm, f.batchnorm_op, f.layer) for f in result.report.folds] == [("sub", "x * scale + shift", "conv")]
    assert not {torch.mul, torch.sub} & {getattr(torch, str(getattr(n.target, "__name__", "")), None) for n in result.model.graph.nodes}
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


@pytest.mark.parametrize(
    ("scale", "shift"),
    [
        (torch.rand(1, 1, 6, 6), 0.0),  # varies over space, not channels
        (torch.rand(2, 4, 1, 1), 0.0),  # varies over the batch
        (torch.rand(4, 1, 1, dtype=torch.float64), 0.0),  # promotes the output to float64
    ],
    ids=["spatial", "batch", "dtype"],
)
def test_affine_that_is_not_per_channel_is_not_a_batchnorm(scale, shift):
    model = AffineAfterConv(scale, shift).eval()
    report = fold(model, (torch.randn(2, 3, 8, 8),)).report
    assert not report.folds and not report.skips and report.nodes_before["batchnorm"] == 0


def test_affine_of_literals_or_random_values_is_not_a_batchnorm():
    class Literal(AffineAfterConv):
        def forward(self, x):
            return self.conv(x) * 2.0 + 1.0

    class Random(AffineAfterConv):
        def forward(self, x):
            return self.conv(x) * torch.rand_like(self.scale) + self.shift

    for model in (Literal(torch.ones(4, 1, 1), 0.0), Random(torch.ones(4, 1, 1), 0.0)):
        report = fold(model.eval(), (torch.randn(2, 3, 8, 8),), verify=False).report
        assert not report.folds and not report.skips


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_folds_at_least_as_many_as_torch_fx_fuse(case):
    model, inputs = trained_eval_model(case)
    fuse_folded = fuse_folds(model)
    bnfold_folded = len(fold(model, inputs, verify=False).report.folds)
    assert bnfold_folded >= fuse_folded


# --- dtypes, scripting, export, parameters -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_folded_model_keeps_dtype(dtype):
    model, inputs = trained_eval_model(case_named("resnet"))
    model, inputs = model.to(dtype), tuple(x.to(dtype) for x in inputs)
    result = fold(model, inputs)

    assert batchnorm_modules(result.model) == 0
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_folded_resnet_still_scripts():
    model, inputs = trained_eval_model(case_named("resnet"))
    torch.jit.script(model)  # works before
    folded = fold(model, inputs).model
    assert_same_outputs(outputs(model, inputs), outputs(torch.jit.script(folded), inputs))


def test_folded_mobilenet_still_exports():
    model, inputs = trained_eval_model(case_named("mobilenet_v2"))
    torch.export.export(model, inputs)  # works before
    exported = torch.export.export(fold(model, inputs).model, inputs)
    assert_same_outputs(outputs(model, inputs), exported.module()(*inputs))


def test_parameters_keep_requires_grad_and_new_bias_follows_weight():
    model, inputs = trained_eval_model(case_named("resnet"))
    model.conv1.weight.requires_grad_(False)
    result = fold(model, inputs)

    assert isinstance(result.model.conv1.bias, nn.Parameter)
    assert not result.model.conv1.weight.requires_grad and not result.model.conv1.bias.requires_grad
    assert result.model.layers[0].conv1.bias.requires_grad


def test_the_folded_copy_shares_no_container_with_the_model():
    model, inputs = trained_eval_model(case_named("resnet"))
    model.conv1.register_forward_hook(lambda module, args, output: None)
    shared = {}
    model.conv1.notes, model.fc.notes = shared, shared  # an empty dict two modules hold: shared in the copy too
    result = fold(model, inputs)

    folded_conv = result.model.conv1
    assert len(folded_conv._forward_hooks) == 1  # the hook came along, as with copy.deepcopy
    folded_conv.register_forward_pre_hook(lambda module, args: None)
    folded_conv.notes["k"] = 1
    assert len(model.conv1._forward_pre_hooks) == 0 and shared == {}
    assert result.model.fc.notes is folded_conv.notes and folded_conv.notes is not shared


def test_the_folded_copy_copies_buffers_and_keeps_their_shared_storages():
    model, inputs = trained_eval_model(case_named("resnet"))
    model.fc.register_buffer("table", torch.arange(6.0))
    model.fc.register_buffer("tail", model.fc.table[2:])  # a view: deepcopy keeps it one, so must the copy
    model.fc.register_buffer("repeated", torch.ones(1).expand(4))  # one element, strides 0: so in the copy too
    result = fold(model, inputs)

    assert result.model.fc.repeated.stride() == (0,) and result.model.fc.repeated.untyped_storage().nbytes() == 4

    table, tail = result.model.fc.table, result.model.fc.tail
    assert tail.untyped_storage().data_ptr() == table.untyped_storage().data_ptr() and tail.storage_offset() == 2
    assert table.untyped_storage().data_ptr() != model.fc.table.untyped_storage().data_ptr()
    buffers = dict(result.model.named_buffers())
    for name, original in model.named_buffers():
        if name in buffers:
            assert torch.equal(buffers[name], original)
            assert buffers[name].untyped_storage().data_ptr() != original.untyped_storage().data_ptr(), name
    table[3] = -1.0
    assert tail[1] == -1.0 and model.fc.table[3] == 3.0


def test_a_model_holding_sparse_or_wrapper_subclass_buffers_is_copied_as_deepcopy_copies_it():
    from torch.testing._internal.two_tensor import TwoTensor  # a wrapper subclass: no storage of its own to read

    model, inputs = trained_eval_model(case_named("resnet"))
    model.fc.register_buffer("mask", torch.eye(3).to_sparse())
    model.fc.register_buffer("pair", TwoTensor(torch.zeros(3), torch.ones(3)))
    result = fold(model, inputs)

    assert result.model.fc.mask.is_sparse and torch.equal(result.model.fc.mask.to_dense(), torch.eye(3))
    assert type(result.model.fc.pair) is TwoTensor and result.model.fc.pair is not model.fc.pair
    assert result.report.verification.passed


def test_the_proving_run_records_a_value_once_unless_changed_in_place_between_calls():
    model = randomise_statistics(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(4))
    ).eval()
    traced = tracing.trace_model(model, (torch.randn(2, 3, 6, 6),), calls.fold_end_modules)

    recorded = {path: values for path, (values,) in traced.model_run.calls.items()}
    assert recorded["0"][1] is recorded["1"][0]  # the conv's output is the BatchNorm's input: one copy
    # The ReLU changed the second conv's output in place before the BatchNorm read it: each has its own values.
    assert recorded["2"][1] is not recorded["4"][0] and recorded["2"][1].min() < 0
    assert torch.equal(recorded["4"][0], recorded["2"][1].relu())


def test_folding_under_inference_mode_gives_a_model_usable_outside_it():
    # (F.batch_norm on buffers: fx's graph reads them, whose version counters the trace check keeps)
    model = FunctionalBatchNorm().eval()
    with torch.inference_mode():
        result = fold(model, (torch.randn(2, 3, 8, 8),))

    assert "pairs found with torch.fx symbolic tracing" in result.report.notes and len(result.report.folds) == 1
    assert not any(parameter.is_inference() for parameter in result.model.parameters())
    result.model(torch.randn(2, 3, 8, 8)).sum().backward()  # records gradients through the folded conv


def test_inplace_folds_the_given_model():
    model, inputs = trained_eval_model(case_named("resnet"))
    expected = outputs(model, inputs)
    result = fold(model, inputs, inplace=True)

    assert result.model is model and batchnorm_modules(model) == 0
    assert_same_outputs(expected, outputs(model, inputs))


def test_folded_values_go_into_the_users_parameters_memory_and_take_their_own_in_a_copy():
    model, inputs = trained_eval_model(case_named("resnet"))
    conv = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    others = [module.weight for module in model.modules() if isinstance(module, nn.Conv2d) and module is not conv]
    before = {id(weight): (weight.detach().clone(), weight.data_ptr()) for weight in [conv.weight, *others]}

    copied = fold(model, inputs).model
    copied_conv = dict(copied.named_modules())[next(name for name, module in model.named_modules() if module is conv)]
    assert all(torch.equal(weight, before[id(weight)][0]) for weight in [conv.weight, *others])  # the original as it was
    # In the copy, each contiguous weight now holds the folded values' memory, a channels-last one its own layout.
    assert copied_conv.weight.is_contiguous(memory_format=torch.channels_last) and not copied_conv.weight.is_contiguous()
    assert not torch.equal(copied_conv.weight, conv.weight)

    views = {id(weight): weight.detach().view(-1)[:3] for weight in others}
    folded = fold(model, inputs, inplace=True).model
    assert folded is model and conv.weight.is_contiguous(memory_format=torch.channels_last)
    for weight in others:  # written into the memory the user's views of them share
        assert weight.data_ptr() == before[id(weight)][1] and torch.equal(views[id(weight)], weight.detach().view(-1)[:3])
        assert not torch.equal(weight, before[id(weight)][0])


def test_inplace_is_not_honoured_when_the_result_is_a_graph_module():
    model, inputs = randomise_statistics(FunctionalConvBatchNormAct()), (torch.randn(2, 3, 8, 8),)
    state_before = copy.deepcopy(model.state_dict())
    result = fold(model, inputs, inplace=True)

    assert isinstance(result.model, fx.GraphModule) and "inplace=True" in result.report.notes[0]
    assert model.state_dict().keys() == state_before.keys()
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in state_before.items())


def test_report_counts():
    model, inputs = trained_eval_model(case_named("resnet"))
    report = fold(model, inputs).report

    assert report.nodes_before["batchnorm"] == 6 and report.nodes_after["batchnorm"] == 0
    assert report.nodes_before["total"] - report.nodes_after["total"] == 6
    assert "torch.fx" in report.notes[0]


def test_verification_failure_raises_with_the_report():
    model, inputs = trained_eval_model(case_named("resnet"))
    with pytest.raises(VerificationError) as raised:
        fold(model, inputs, atol=0.0, rtol=0.0)
    assert not raised.value.verification.passed and raised.value.report.folds


class _CountsItsRuns(nn.Module):
    """Two conv -> BatchNorm pairs, counting the runs of its forward (on the class: copies count too)."""

    runs = 0

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)

    def forward(self, x):
        type(self).runs += 1
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_verification_reuses_the_trace_checks_run_and_still_catches_a_wrong_fold(monkeypatch):
    # The run that proves fx's graph gives the expected outputs and each fold's values: fx's trace, that run and
    # the folded model's run are all (before: the original ran once more).
    torch.manual_seed(0)  # (a draw where channel 1 of bn2's output is small passes the corrupted fold's outputs)
    model, inputs = randomise_statistics(_CountsItsRuns()), (torch.randn(2, 3, 8, 8),)
    _CountsItsRuns.runs = 0
    result = fold(model, inputs)
    assert _CountsItsRuns.runs == 3
    assert [check.status for check in result.report.verification.folds] == ["passed", "passed"]

    write = rewrite._write_folded_weights

    def write_then_corrupt(folds, traced, copied):
        write(folds, traced, copied)
        with torch.no_grad():
            traced.model.conv2.weight[1] *= 1 + 1e-1

    monkeypatch.setattr(rewrite, "_write_folded_weights", write_then_corrupt)
    with pytest.raises(VerificationError) as raised:
        fold(model, inputs)
    verification = raised.value.verification
    (failed,) = verification.failed_folds
    assert failed.fold.startswith("bn2 [BatchNorm2d] into preceding conv2") and failed.channel == 1
    assert [output.status for output in verification.outputs] == ["failed"]
    assert verification.outputs[0].max_rel_error > 3 * verification.outputs[0].rtol  # (a margin, on any CPU)


def test_nested_outputs_are_all_compared():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return {"features": y, "pooled": [y.mean((2, 3)), y.amax((2, 3))]}

    result = fold(randomise_statistics(TwoHeads()), (torch.randn(2, 3, 8, 8),))
    names = [o.name for o in result.report.verification.outputs]
    assert names == ["output['features']", "output['pooled'][0]", "output['pooled'][1]"]


# --- single-pattern models ---------------------------------------------------------------------


class BatchNormThenLayer(nn.Module):
    """BN on the input straight into a layer: only a forward fold is possible."""

    def __init__(self, layer: nn.Module, batchnorm: nn.Module):
        super().__init__()
        self.bn, self.layer = batchnorm, layer

    def forward(self, x):
        return self.layer(self.bn(x))


@pytest.mark.parametrize(
    ("layer", "batchnorm", "shape"),
    [
        (nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(4), (2, 4, 9, 9)),
        (nn.Conv2d(4, 6, 3, padding="valid", bias=False), nn.BatchNorm2d(4, affine=False), (2, 4, 7, 7)),
        (nn.Conv1d(4, 4, 1, padding="same", padding_mode="reflect"), nn.BatchNorm1d(4), (2, 4, 7)),
        (nn.Linear(5, 3), nn.BatchNorm1d(5), (6, 5)),
        # Padding that copies the input's values pads with normalised values: nothing to leave unshifted.
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2), nn.BatchNorm2d(4), (2, 4, 7, 7)),
        (nn.Conv1d(4, 4, 3, padding="same", padding_mode="replicate"), nn.BatchNorm1d(4), (2, 4, 7)),
        (nn.Conv3d(4, 2, 3, padding=2, padding_mode="circular", bias=False), nn.BatchNorm3d(4), (2, 4, 5, 5, 5)),
    ],
    ids=["conv-grouped", "conv-valid-affine-false", "conv-same-1x1", "linear", "reflect", "replicate", "circular"],
)
def test_batchnorm_folds_into_following_layer(layer, batchnorm, shape):
    model = randomise_statistics(BatchNormThenLayer(layer, batchnorm))
    inputs = (torch.randn(shape),)
    result = fold(model, inputs)

    assert [f.direction for f in result.report.folds] == ["into-following"]
    assert isinstance(result.model.bn, nn.Identity)
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_layer_absorbs_a_batchnorm_on_each_side():
    model = randomise_statistics(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert sorted(f.direction for f in result.report.folds) == ["into-following", "into-preceding"]
    assert batchnorm_modules(result.model) == 0
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))
    # Both folds in float64, in plan order, each value rounded once to float32 at the end.
    before, conv, after = model
    affines = [fold_math.batchnorm_affine(*(t.detach().double().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)), bn.eps) for bn in (before, after)]
    layout = fold_math.WeightLayout("conv", 1)
    weight, bias = fold_math.fold_into_inputs(conv.weight.detach().numpy(), None, affines[0], layout, out_dtype=np.float64)
    weight, bias = fold_math.fold_into_outputs(weight, bias, affines[1], layout, out_dtype=np.float64)
    assert np.array_equal(result.model[1].weight.detach().numpy(), weight.astype(np.float32))
    assert np.array_equal(result.model[1].bias.detach().numpy(), bias.astype(np.float32))


def test_eval_dropout_and_identity_between_the_pair_do_not_block_the_fold():
    model, inputs = trained_eval_model(case_named("dropout_heads"))
    result = fold(model, inputs)

    assert type(result.model) is type(model)
    assert [(f.batchnorm, f.layer, f.direction) for f in result.report.folds] == [
        ("features.1", "features.0", "into-preceding"),
        ("embed.3", "embed.0", "into-preceding"),
        ("neck", "classifier.1", "into-following"),
    ]
    # The Dropouts and the Identity stay where they were: in train mode they would act again.
    assert [type(m) for m in result.model.embed] == [nn.Linear, nn.Identity, nn.Dropout, nn.Identity, nn.ReLU]
    assert isinstance(result.model.classifier[0], nn.Dropout)
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class DropoutOutputShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.drop, self.bn = nn.Linear(6, 8), nn.Dropout(), nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.drop(self.linear(x))
        return self.bn(y) + y


class FunctionalDropoutTrainingBetween(nn.Module):
    """F.dropout(training=True) is active even in eval mode: it is a reader, not a pass-through."""

    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(F.dropout(self.linear(x), 0.5, training=True))


def test_a_reader_after_the_dropout_or_an_active_dropout_still_blocks_the_fold():
    report = fold(randomise_statistics(DropoutOutputShared()), (torch.randn(4, 6),)).report
    assert skip_codes(report) == {"bn": "layer-output-shared"} and "`add`" in report.skips[0].reason
    report = fold(randomise_statistics(FunctionalDropoutTrainingBetween()), (torch.randn(4, 6),), verify=False).report
    assert skip_codes(report) == {"bn": "no-foldable-neighbour"}


class FunctionalDropoutEvalBetween(FunctionalDropoutTrainingBetween):
    """F.dropout(x, p, self.training) in an eval-mode model returns x: a pass-through, like an nn.Dropout."""

    def forward(self, x):
        return self.bn(F.dropout(self.linear(x), 0.5, self.training))


def test_functional_dropout_with_training_false_is_a_pass_through():
    model = randomise_statistics(FunctionalDropoutEvalBetween())
    inputs = (torch.randn(4, 6),)
    result = fold(model, inputs)

    assert type(result.model) is FunctionalDropoutEvalBetween and isinstance(result.model.bn, nn.Identity)
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("bn", "linear")]
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class LinearThenRearranged(nn.Module):
    """A Linear on (B, N, C) tokens, ``rearrange`` of its output, then ``batchnorm``."""

    def __init__(self, rearrange, batchnorm: nn.Module):
        super().__init__()
        self.linear, self.rearrange, self.bn = nn.Linear(4, 6, bias=False), rearrange, batchnorm

    def forward(self, x):
        return self.bn(self.rearrange(self.linear(x)))


@pytest.mark.parametrize(
    ("rearrange", "batchnorm"),
    [
        (lambda h: h.flatten(0, 1), nn.BatchNorm1d(6)),  # LeViT's LinearNorm
        (lambda h: h.permute(0, 2, 1), nn.BatchNorm1d(6)),
        (lambda h: h.transpose(1, 2).unsqueeze(-1), nn.BatchNorm2d(6)),
        (lambda h: torch.reshape(h, (-1, 6)), nn.BatchNorm1d(6)),
        (lambda h: torch.transpose(h, dim0=1, dim1=2), nn.BatchNorm1d(6)),
        (lambda h: h.swapaxes(1, axis1=-1), nn.BatchNorm1d(6)),
        (lambda h: h.clone().swapdims(1, 2), nn.BatchNorm1d(6)),
        (lambda h: torch.movedim(h.unsqueeze(1), (3, 1), destination=(1, 3)), nn.BatchNorm2d(6)),
        (nn.Sequential(nn.Flatten(0, 1), nn.Unflatten(1, (6, 1))), nn.BatchNorm1d(6)),  # modules: call_module nodes
        (lambda h: h.to(torch.float32).float().flatten(0, 1), nn.BatchNorm1d(6)),  # conversions to the same dtype
    ],
    ids=[
        "flatten", "permute", "transpose-unsqueeze", "reshape", "transpose-keywords", "swapaxes-keyword", "clone-swapdims",
        "movedim", "flatten-unflatten-modules", "same-dtype",
    ],
)
def test_batchnorm_on_the_linear_features_folds_through_reshapes_and_permutes(rearrange, batchnorm):
    model = randomise_statistics(LinearThenRearranged(rearrange, batchnorm))
    inputs = (torch.randn(2, 5, 4),)
    result = fold(model, inputs)

    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("bn", "linear")]
    assert type(result.model) is LinearThenRearranged and isinstance(result.model.bn, nn.Identity)
    assert result.report.verification.passed
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


@pytest.mark.parametrize(
    ("rearrange", "batchnorm", "words"),
    [
        (lambda h: h.view(2, 5, 2, 3).transpose(1, 2), nn.BatchNorm2d(2), "split or merge"),
        (lambda h: h.flatten(1), nn.BatchNorm1d(30), "split or merge"),
        (lambda h: h.view(2, 30, 1), nn.BatchNorm1d(30), "split or merge"),
        (lambda h: h.transpose(0, 1), nn.BatchNorm1d(2), "do not line up"),
        (lambda h: h.movedim(-1, 0), nn.BatchNorm1d(2), "do not line up"),
    ],
    ids=["features-split", "tokens-merged", "tokens-merged-3d", "other-axis", "movedim-other-axis"],
)
def test_batchnorm_on_other_axes_than_the_linear_features_stays(rearrange, batchnorm, words):
    model = randomise_statistics(LinearThenRearranged(rearrange, batchnorm))
    report = fold(model, (torch.randn(2, 5, 4),)).report
    assert skip_codes(report) == {"bn": "channel-mismatch"} and words in report.skips[0].reason


def test_a_conversion_to_another_dtype_between_the_pair_blocks_the_fold():
    # float64 -> float32 rounds the layer's output: the BatchNorm sees other values than the layer made.
    model = randomise_statistics(LinearThenRearranged(lambda h: h.float().flatten(0, 1), nn.BatchNorm1d(6))).double()
    model.bn.float()
    inputs = (torch.randn(2, 5, 4, dtype=torch.float64),)
    result = fold(model, inputs)

    assert not result.report.folds and skip_codes(result.report) == {"bn": "no-foldable-neighbour"}
    assert "comes from `.float()` (through `.flatten()`), which converts `linear`'s output from float64 to float32" in result.report.skips[0].reason


class UnbatchedConv(nn.Module):
    """A Conv1d on an unbatched (C, L) input: its features are axis 0 of its output."""

    def __init__(self, rearrange):
        super().__init__()
        self.conv, self.bn, self.rearrange = nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), rearrange

    def forward(self, x):
        return self.bn(self.rearrange(self.conv(x)))


def test_a_conv_on_an_unbatched_input_has_its_features_on_axis_0():
    # (4, 4): BatchNorm1d normalises axis 1, the length, which has as many elements as the conv has channels.
    length_normalised = randomise_statistics(UnbatchedConv(nn.Identity()))
    report = fold(length_normalised, (torch.randn(3, 6),)).report
    assert skip_codes(report) == {"bn": "channel-mismatch"} and "axis 0 of its output" in report.skips[0].reason

    channels_normalised = randomise_statistics(UnbatchedConv(lambda h: h.unsqueeze(0)))
    inputs = (torch.randn(3, 6),)
    result = fold(channels_normalised, inputs)
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("bn", "conv")]
    assert [check.status for check in result.report.verification.folds] == ["passed"]
    assert_same_outputs(outputs(channels_normalised, inputs), outputs(result.model, inputs))


class BatchNormViewedThenLayer(BatchNormThenLayer):
    def forward(self, x):
        return self.layer(self.bn(x).view(x.shape[0], 1, -1).view(x.shape))


def test_a_one_channel_batchnorm_on_a_batch_of_one_is_followed_through_a_reshape():
    # (1, 1, 4, 4) viewed as (1, 1, 16): either size-1 axis could be the channel; it stays where it was.
    model = randomise_statistics(BatchNormViewedThenLayer(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(1)))
    inputs = (torch.randn(1, 1, 4, 4),)
    result = fold(model, inputs)

    assert [(f.batchnorm, f.layer, f.direction) for f in result.report.folds] == [("bn", "layer", "into-following")]
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_a_view_that_reinterprets_the_dtype_is_no_pass_through():
    bit_view = LinearThenRearranged(lambda h: h.view(torch.int32).view(torch.float32).flatten(0, 1), nn.BatchNorm1d(6))
    report = fold(randomise_statistics(bit_view), (torch.randn(2, 5, 4),)).report
    assert skip_codes(report) == {"bn": "no-foldable-neighbour"}


class TokensWithShapeArithmetic(nn.Module):
    """LinearNorm, F.dropout(training=False) and a permute between pairs, in a forward torch.fx cannot trace
    (``math.ceil`` of a size): the exported graph's aten reshapes, dropout and permute pass values the same way."""

    def __init__(self):
        super().__init__()
        self.qkv = LinearNorm(4, 6)
        self.linear, self.bn = nn.Linear(6, 6, bias=False), nn.BatchNorm1d(6)
        self.proj, self.proj_bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        if math.ceil(x.shape[1] / 2) > 1:
            x = x * 2
        y = self.bn(F.dropout(self.linear(self.qkv(x)).flatten(0, 1), 0.2, self.training))
        return self.proj_bn(self.proj(y.view(x.shape[0], x.shape[1], 6)).permute(0, 2, 1))


def test_pass_through_calls_in_an_exported_graph():
    model = randomise_statistics(TokensWithShapeArithmetic())
    inputs = (torch.randn(2, 5, 4),)
    result = fold(model, inputs)

    assert any("torch.export" in note for note in result.report.notes)
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("qkv.bn", "qkv.linear"), ("bn", "linear"), ("proj_bn", "proj")]
    assert type(result.model) is TokensWithShapeArithmetic
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class DropoutBetweenWithShapeArithmetic(nn.Module):
    """A dropout module between conv and BatchNorm in a forward torch.fx cannot trace (``math.ceil`` of a size)."""

    def __init__(self, dropout: nn.Module):
        super().__init__()
        self.conv, self.drop, self.bn = nn.Conv2d(3, 4, 3), dropout, nn.BatchNorm2d(4)

    def forward(self, x):
        if math.ceil(x.shape[-1] / 2) > 1:
            x = x * 2
        return self.bn(self.drop(self.conv(x)))


class SwapsAndMovesAxes(nn.Module):
    def forward(self, x):
        return x.swapdims(1, 3).movedim(3, 1).moveaxis(1, -1).swapaxes(1, -1)


@pytest.mark.parametrize(
    "dropout", [nn.Dropout2d(), nn.AlphaDropout(), nn.FeatureAlphaDropout(), SwapsAndMovesAxes()], ids=lambda d: type(d).__name__
)
def test_eval_mode_dropouts_and_axis_moves_in_an_exported_graph_are_pass_throughs(dropout):
    # torch.export records each as its own aten op: feature_dropout, alpha_dropout, ... (with train=False),
    # swapdims, movedim, ...
    model = randomise_statistics(DropoutBetweenWithShapeArithmetic(dropout))
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert any("torch.export" in note for note in result.report.notes)
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("bn", "conv")]
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_training_mode_is_refused_with_a_clear_error():
    model, inputs = trained_eval_model(case_named("resnet"))
    with pytest.raises(ValueError, match=r"\.eval\(\)"):
        fold(model.train(), inputs)
    mobilenet, inputs = trained_eval_model(case_named("mobilenet_v2"))
    mobilenet.classifier[0].train()  # a Dropout alone counts too
    with pytest.raises(ValueError, match="classifier.0"):
        fold(mobilenet, inputs)


class ConvThenBatchNorm(nn.Module):
    def __init__(self, batchnorm: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = batchnorm or nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class SharedConvOutput(ConvThenBatchNorm):
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ReusedConv(ConvThenBatchNorm):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(F.relu(self.bn(self.conv(x)))))


class OrderNotDataFlow(ConvThenBatchNorm):
    """``bn`` follows ``conv`` in __init__ but reads the model input in forward."""

    def __init__(self):
        super().__init__(nn.BatchNorm2d(3))
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class LinearOnSequence(nn.Module):
    """Linear on (N, L, C) then BatchNorm1d on axis 1 (L): the channel axes do not line up."""

    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.linear(x))


def _infinite_scale() -> nn.BatchNorm2d:
    batchnorm = nn.BatchNorm2d(4)
    with torch.no_grad():
        batchnorm.weight[2] = float("inf")
    return batchnorm


@pytest.mark.parametrize(
    ("model", "inputs", "expected"),
    [
        (ConvThenBatchNorm(nn.BatchNorm2d(4, track_running_stats=False)), (2, 3, 6, 6), {"bn": "batch-statistics"}),
        (SharedConvOutput(), (2, 3, 6, 6), {"bn": "layer-output-shared"}),
        (ReusedConv(), (2, 4, 6, 6), {"bn": "module-reused", "bn2": "module-reused"}),
        (ConvThenBatchNorm(_infinite_scale()), (2, 3, 6, 6), {"bn": "unfoldable-statistics"}),
        (OrderNotDataFlow(), (2, 3, 6, 6), {"bn": "no-foldable-neighbour", "unused": "no-foldable-neighbour"}),
        (BatchNormThenLayer(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), (2, 4, 6, 6), {"bn": "padded-conv"}),
        (
            BatchNormThenLayer(nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d(4)),
            (2, 4, 6, 6),
            {"bn": "no-foldable-neighbour"},
        ),
        (LinearOnSequence(), (2, 4, 4), {"bn": "channel-mismatch"}),
    ],
    ids=["batch-statistics", "shared-output", "reused", "unfoldable", "order", "padded", "transposed", "channels"],
)
def test_refusals_have_codes_and_reasons(model, inputs, expected):
    model = randomise_statistics(model)
    state_before = copy.deepcopy(model.state_dict())
    result = fold(model, (torch.randn(inputs),))

    assert skip_codes(result.report) == expected and not result.report.folds
    assert all(skip.code in SKIP_CODES and skip.reason.endswith((".", ")")) for skip in result.report.skips)
    assert all(torch.equal(t, result.model.state_dict()[k]) for k, t in state_before.items())


class FakeQuantizedConv2d(nn.Conv2d):
    """A quantization-aware conv as brevitas's QuantConv2d and torch.ao's QAT Conv2d compute it: the weight
    fake-quantized (per tensor, 4 bits) at every call, from the float parameter."""

    def forward(self, x):
        step = self.weight.detach().abs().max() / 7
        weight = self.weight + (torch.clamp(torch.round(self.weight / step), -8, 7) * step - self.weight).detach()
        return self._conv_forward(x, weight, self.bias)


def test_a_quantization_aware_layer_absorbs_nothing_and_the_reason_says_to_fold_before_quantizing():
    # Folding into the float weight would move what the quantizer rounds: the quantized outputs would change.
    model = ConvThenBatchNorm()
    model.conv = FakeQuantizedConv2d(3, 4, 3)
    model = randomise_statistics(model)
    inputs = (torch.randn(2, 3, 6, 6),)
    result = fold(model, inputs)

    assert skip_codes(result.report) == {"bn": "weight-not-constant"}
    assert "fold before quantizing" in result.report.skips[0].reason
    assert torch.equal(outputs(model, inputs), outputs(result.model, inputs))


@pytest.mark.parametrize(
    "parametrization", [nn.utils.parametrizations.weight_norm, nn.utils.parametrizations.spectral_norm], ids=["weight_norm", "spectral_norm"]
)
def test_a_parametrized_layer_computes_its_weight_at_each_call_and_absorbs_nothing(parametrization):
    model = ConvThenBatchNorm()
    model.conv = parametrization(model.conv)
    model = randomise_statistics(model)
    inputs = (torch.randn(2, 3, 6, 6),)
    result = fold(model, inputs, verify=False)  # (verification checks the outputs below)

    assert skip_codes(result.report) == {"bn": "weight-not-constant"}
    assert "remove_parametrizations" in result.report.skips[0].reason
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


@pytest.mark.parametrize("hooked", ["conv", "bn"])
def test_a_layer_or_batchnorm_with_hooks_stays_and_its_hooks_see_what_they_saw(hooked):
    model = randomise_statistics(ConvThenBatchNorm())
    seen = []
    getattr(model, hooked).register_forward_hook(lambda module, args, output: seen.append(output) or output + 1)
    inputs = (torch.randn(2, 3, 6, 6),)
    expected = outputs(model, inputs)
    result = fold(model, inputs)

    assert skip_codes(result.report) == {"bn": "hooked-module"}
    assert f"`{hooked}` has hooks" in result.report.skips[0].reason
    seen.clear()
    assert_same_outputs(expected, outputs(result.model, inputs))
    assert len(seen) == 1


def test_an_identity_with_hooks_between_the_pair_is_no_pass_through():
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(4)))
    model[1].register_forward_hook(lambda module, args, output: output * 2)
    result = fold(model, (torch.randn(2, 3, 6, 6),))
    assert skip_codes(result.report) == {"2": "hooked-module"}  # (the hook is the reason: no-foldable-neighbour before)


def test_refusal_reasons_name_the_neighbours():
    model = randomise_statistics(SharedConvOutput())
    (skip,) = fold(model, (torch.randn(2, 3, 6, 6),)).report.skips
    assert "`conv`" in skip.reason and "`add`" in skip.reason


class CalledWithKeywords(nn.Module):
    """Layer and BatchNorm modules called as ``module(input=x)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.bn_in, self.linear = nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(input=self.conv(input=x)).mean((2, 3))
        return self.linear(input=self.bn_in(input=y))


def test_modules_called_with_keyword_input_fold_and_are_checked_on_their_own():
    model = randomise_statistics(CalledWithKeywords())
    inputs = (torch.randn(2, 3, 6, 6),)
    result = fold(model, inputs)

    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("bn", "conv"), ("bn_in", "linear")]
    assert [check.status for check in result.report.verification.folds] == ["passed", "passed"]
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


# --- functional calls and the export fallback --------------------------------------------------


class FunctionalBatchNorm(nn.Module):
    """F.batch_norm on buffers of the model, after a conv module and before an F.conv2d."""

    def __init__(self, training_flag: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.kernel = nn.Parameter(torch.randn(5, 4, 1, 1))
        self.training_flag = training_flag

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.mean, self.var, self.scale, None, training=self.training_flag, eps=1e-3)
        return F.conv2d(x, self.kernel)


def test_functional_batch_norm_folds_in_the_traced_graph():
    model = FunctionalBatchNorm().eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert isinstance(result.model, fx.GraphModule)
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("batch_norm", "conv")]
    assert F.batch_norm not in {n.target for n in result.model.graph.nodes}
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class TwoBatchNormsBetweenLayers(nn.Module):
    """conv -> bn -> bn2 -> F.conv2d: both fold into the conv before them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.kernel = nn.Parameter(torch.randn(5, 4, 1, 1))

    def forward(self, x):
        return F.conv2d(self.bn2(self.bn(self.conv(x))), self.kernel)


def test_two_batchnorms_in_a_row_before_a_function_call_fold_into_the_module_before_them():
    model = randomise_statistics(TwoBatchNormsBetweenLayers())
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert [(f.batchnorm, f.layer, f.direction) for f in result.report.folds] == [
        ("bn", "conv", "into-preceding"),
        ("bn2", "conv", "into-preceding"),
    ]
    assert type(result.model) is TwoBatchNormsBetweenLayers and batchnorm_modules(result.model) == 0
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class FunctionalBatchNormHeads(FunctionalBatchNorm):
    def forward(self, x):
        y = super().forward(x)
        return {"features": y, "pooled": [y.mean((2, 3))]}


def test_a_forward_returning_a_dict_and_list_is_read_from_its_fx_graph():
    # The fx graph keeps them as immutable_dict/immutable_list: the same outputs all the same.
    model = FunctionalBatchNormHeads().eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert "pairs found with torch.fx symbolic tracing" in result.report.notes
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("batch_norm", "conv")]
    folded = outputs(result.model, inputs)
    assert type(folded) is dict and type(folded["pooled"]) is list
    assert_same_outputs(outputs(model, inputs)["features"], folded["features"])


def test_functional_batch_norm_in_training_mode_stays():
    model = FunctionalBatchNorm(training_flag=True).eval()
    result = fold(model, (torch.randn(2, 3, 8, 8),))
    assert skip_codes(result.report) == {"batch_norm": "training-mode"}


class ShapeBranchNet(nn.Module):
    """Branches on an input size, which torch.fx cannot trace but torch.export can."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.same = Conv2dSame(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return self.bn(self.same(self.stem(x)))


def test_untraceable_model_falls_back_to_export():
    model = randomise_statistics(ShapeBranchNet())
    inputs = (torch.randn(2, 3, 9, 9),)
    result = fold(model, inputs)

    assert type(result.model) is ShapeBranchNet
    assert any("torch.export" in note for note in result.report.notes)
    # The "same" conv runs its own forward, which convolves with self.weight and self.bias: its parameters
    # carry the fold, and the bias it had not gets registered where its forward reads it.
    assert [(f.batchnorm, f.layer, f.layer_op) for f in result.report.folds] == [
        ("stem.1", "stem.0", "Conv2d"),
        ("bn", "same", "Conv2dSame"),
    ]
    assert isinstance(result.model.bn, nn.Identity) and isinstance(result.model.same.bias, nn.Parameter)
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class ShapeBranchIgnoringBias(ShapeBranchNet):
    def __init__(self):
        super().__init__()
        self.same = ConvIgnoringBias(4, 4, 3, bias=False)


def test_export_fallback_leaves_a_layer_subclass_whose_forward_does_not_read_its_bias():
    model = randomise_statistics(ShapeBranchIgnoringBias())
    inputs = (torch.randn(2, 3, 9, 9),)
    result = fold(model, inputs)

    assert [f.batchnorm for f in result.report.folds] == ["stem.1"]
    assert skip_codes(result.report) == {"bn": "no-foldable-neighbour"}
    assert "function call" in result.report.skips[0].reason
    # The bias probed while exporting is gone again.
    assert model.same.bias is None and result.model.same.bias is None
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_model_torch_fx_cannot_trace_folds_into_its_own_modules_and_runs_at_other_sizes():
    model, inputs = trained_eval_model(case_named("tf_mobilevit"))
    with pytest.raises(fx.proxy.TraceError):  # math.ceil of a traced size
        fx.symbolic_trace(model)
    result = fold(model, inputs)

    assert type(result.model) is TfMobileVit and batchnorm_modules(result.model) == 0
    assert any("torch.export" in note for note in result.report.notes)
    assert ("bn1", "BatchNormAct2d", "conv_stem", "DynamicConv2dSame") in {
        (f.batchnorm, f.batchnorm_op, f.layer, f.layer_op) for f in result.report.folds
    }
    assert isinstance(result.model.conv_stem.bias, nn.Parameter)
    # The user's forward, not a graph specialised to the example's shape: another size (no interpolation
    # in the MobileViT block at 16x16) runs and matches, and the result exports again.
    other = (torch.randn(1, 3, 16, 16),)
    assert_same_outputs(outputs(model, other), outputs(result.model, other))
    assert_same_outputs(outputs(model, inputs), torch.export.export(result.model, inputs).module()(*inputs))


def test_export_fallback_reports_batch_statistics_under_the_module_name():
    class Branching(ConvThenBatchNorm):
        def forward(self, x):
            return self.bn(self.conv(x)) if x.shape[0] > 1 else self.conv(x)

    batchnorm = nn.BatchNorm2d(4, affine=False, track_running_stats=False)
    result = fold(Branching(batchnorm).eval(), (torch.randn(2, 3, 6, 6),))
    assert skip_codes(result.report) == {"bn": "batch-statistics"}


class _ConvThenBatchNorm(nn.Module):
    """A conv and a BatchNorm; subclasses say what runs between them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)


class _TracesAnotherGraph(_ConvThenBatchNorm):
    """Under fx, ``x`` is a proxy, not a tensor: the trace records ``bn(conv(x))``, a pair the model never
    runs (it normalises ``relu(conv(x))``)."""

    def forward(self, x):
        h = self.conv(x)
        if isinstance(x, torch.Tensor):
            return self.bn(torch.relu(h))
        return self.bn(h)


def test_a_traced_graph_that_is_not_the_models_falls_back_to_export_and_folds_nothing_false():
    torch.manual_seed(0)
    model = randomise_statistics(_TracesAnotherGraph())
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)  # before: a conv -> bn fold that verification rejected
    assert result.report.folds == []
    assert [skip.code for skip in result.report.skips] == ["no-foldable-neighbour"]
    assert any("traced graph computes other outputs than the model" in note for note in result.report.notes)
    torch.testing.assert_close(result.model(*inputs), model(*inputs), rtol=0, atol=0)


def test_the_trace_check_runs_without_verification_too():
    # verify=False skips the comparison of the folded model, not the proof that fx's graph is the model's.
    model = _TracesAnotherGraph().eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs, verify=False)
    assert result.report.folds == []
    assert any("traced graph computes other outputs than the model" in note for note in result.report.notes)


class _CallsTheConvsTheOtherWayWhenRun(nn.Module):
    """fx records ``bn(conv1(x)) + conv2(x)``; the model runs ``bn(conv2(x)) + conv1(x)``. Both convs are called
    on the same input, in the other order: the graph run must not take conv2's result for its conv1 call."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            return self.bn(self.conv2(x)) + self.conv1(x)
        return self.bn(self.conv1(x)) + self.conv2(x)


def test_the_trace_check_catches_a_graph_that_calls_its_convs_the_other_way():
    torch.manual_seed(0)
    model = randomise_statistics(_CallsTheConvsTheOtherWayWhenRun())
    result = fold(model, (torch.randn(2, 3, 8, 8),), verify=False)
    assert any("traced graph computes other outputs than the model" in note for note in result.report.notes)


class _ChangesTheConvOutputInPlace(_ConvThenBatchNorm):
    def forward(self, x):
        h = self.conv(x)
        h.add_(1)
        return self.bn(h)


def test_the_trace_check_graph_run_keeps_its_own_copy_of_a_layer_result_the_model_changes_in_place():
    # The graph takes the conv's result from the model's run; the model then adds 1 to it in place, and so does
    # the graph, once, to its own copy: the outputs agree and the fx graph is used.
    model = _ChangesTheConvOutputInPlace().eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)
    assert "pairs found with torch.fx symbolic tracing" in result.report.notes
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class _RoundsDifferentlyWhenRun(_TracesAnotherGraph):
    """The graph fx records (``bn(conv(x))``) differs from the model's run by one rounding per value."""

    def forward(self, x):
        h = self.conv(x)
        return self.bn(h * (1 + 2**-22) if isinstance(x, torch.Tensor) else h)


def test_the_trace_check_accepts_outputs_equal_up_to_rounding():
    # Outputs that are not bitwise equal still go through the tolerance (a kernel may take another path).
    model = _RoundsDifferentlyWhenRun().eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs, verify=False)
    assert "pairs found with torch.fx symbolic tracing" in result.report.notes
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("bn", "conv")]


def test_a_failed_export_before_dynamo_writes_nothing_to_stderr(capfd):
    # torch.export prints its partial graph and logs warnings before raising; bnfold reports that error itself.
    model, inputs = trained_eval_model(case_named("value_branch"))
    capfd.readouterr()
    result = fold(model, inputs)
    assert any("TorchDynamo captured" in note for note in result.report.notes)
    assert capfd.readouterr().err == ""


def test_only_exports_partial_graph_is_dropped_from_stderr_when_it_fails(capfd):
    error = RuntimeError("data-dependent")
    error.partial_fx_graph = "def forward(self, x):"
    capfd.readouterr()
    with pytest.raises(RuntimeError), tracing._output_kept_unless_it_fails():
        print(error.partial_fx_graph, file=sys.stderr)
        print("another thread's warning", file=sys.stderr)
        raise error
    assert capfd.readouterr().err == "another thread's warning\n"


class _PrintsWhileExported(FrozenAfterConv):
    def forward(self, x):
        print("forward ran", file=sys.stderr)
        return super().forward(x)


def test_what_a_successful_export_writes_to_stderr_is_kept(capfd):
    model = _frozen(_PrintsWhileExported())
    capfd.readouterr()
    result = fold(model, (torch.randn(2, 3, 9, 9),), verify=False)
    assert any("torch.export" in note for note in result.report.notes)
    assert "forward ran" in capfd.readouterr().err


class ValueBranchReusedBatchNorm(nn.Module):
    """One BatchNorm module called twice, after a branch on a value (neither fx nor torch.export)."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.bn = nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 0:
            x = x + 1
        return self.bn(self.conv(x)) * self.bn(self.conv2(x))


def test_a_batchnorm_module_called_twice_in_a_dynamo_graph_is_reused():
    model = randomise_statistics(ValueBranchReusedBatchNorm())
    inputs = (torch.randn(2, 4, 5),)
    result = fold(model, inputs)

    assert "TorchDynamo" in result.report.notes[0]
    assert not result.report.folds and skip_codes(result.report) == {"bn": "module-reused"}
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


def test_model_neither_fx_nor_export_can_capture_folds_the_pairs_dynamo_captures():
    model, inputs = trained_eval_model(case_named("value_branch"))
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(model, inputs)
    result = fold(model, inputs)
    report = result.report

    assert type(result.model) is ValueBranchNet
    assert any("TorchDynamo captured" in note for note in report.notes)
    taken = "positive" if outputs(model.bn, (outputs(model.conv, (outputs(model.stem, inputs),)),)).sum() > 0 else "negative"
    untaken = {"positive": "negative", "negative": "positive"}[taken]
    assert {(f.batchnorm, f.batchnorm_op, f.layer) for f in report.folds} == {
        ("stem.bn", "BatchNormAct2d", "stem.conv"),
        ("bn", "BatchNorm2d", "conv"),
        (f"{taken}.1", "BatchNorm2d", f"{taken}.0"),
    }
    # conv2's output crosses the graph break to bn2: another graph's input, so not a pair.
    assert skip_codes(report) == {"bn2": "no-foldable-neighbour", f"{untaken}.1": "no-foldable-neighbour"}
    assert "graph break" in next(s.reason for s in report.skips if s.batchnorm == "bn2")
    assert "example inputs do not take" in next(s.reason for s in report.skips if s.batchnorm == f"{untaken}.1")
    assert isinstance(result.model.bn, nn.Identity) and isinstance(result.model.get_submodule(f"{untaken}.1"), nn.BatchNorm2d)
    for x in (*inputs, -inputs[0], torch.randn(2, 3, 12, 12)):
        assert_same_outputs(outputs(model, (x,)), outputs(result.model, (x,)))


def test_statistics_that_cancel_in_the_original_do_not_fail_the_fold_check():
    # beta cancels mean * scale: the original's BatchNorm sums terms near 8500 to give values near 1.7 * conv,
    # and rounds at that size; the fold's rounding scale counts those terms (they were left out: 2128 units).
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        mean = torch.tensor([5000.3, -4000.7, 3000.1, 7000.9])
        model[1].running_mean.copy_(mean)
        model[1].running_var.fill_(1.0)
        model[1].weight.fill_(1.7)
        model[1].bias.copy_(mean * 1.7 / math.sqrt(1 + 1e-5))
    inputs = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    result = fold(model, inputs)

    (check,) = result.report.verification.folds
    assert check.status == "passed" and check.units < 16


class BatchNormTwiceThenShared(nn.Module):
    """conv -> bn1 -> bn2 -> relu, and conv2 -> bn3 -> bn4 whose input bn3's output is also added."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv2, self.bn3, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn3(self.conv2(F.relu(self.bn2(self.bn1(self.conv(x))))))
        return self.bn4(y) + y


def test_a_batchnorm_after_a_folded_batchnorm_folds_into_the_same_layer():
    model = randomise_statistics(BatchNormTwiceThenShared())
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert type(result.model) is BatchNormTwiceThenShared
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("bn1", "conv"), ("bn2", "conv"), ("bn3", "conv2")]
    assert skip_codes(result.report) == {"bn4": "layer-output-shared"}  # bn3's output is read by the add too
    assert isinstance(result.model.bn1, nn.Identity) and isinstance(result.model.bn2, nn.Identity)
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class BatchNormThenFunctionalBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("mean", torch.tensor([0.3, -0.2, 0.1, 0.5]))
        self.register_buffer("var", torch.tensor([0.7, 1.3, 0.9, 1.6]))

    def forward(self, x):
        return F.batch_norm(self.bn(self.conv(x)), self.mean, self.var)


def test_a_functional_batchnorm_after_a_folded_batchnorm_folds_into_the_same_layer_in_the_graph():
    model = randomise_statistics(BatchNormThenFunctionalBatchNorm())
    inputs = (torch.randn(2, 3, 8, 8),)
    result = fold(model, inputs)

    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("bn", "conv"), ("batch_norm", "conv")]
    # The graph's second BatchNorm read the first, which is bypassed before it: it now reads the conv.
    assert isinstance(result.model, fx.GraphModule) and F.batch_norm not in {n.target for n in result.model.graph.nodes}
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class _CountsItsCalls(nn.Module):
    """A forward that changes the model's own state: a buffer reassigned (``self.calls = self.calls + 1``) and an
    attribute set. fx's tracer let the buffer hold its proxy, and each later use of it in the graph run added a
    node to the graph being run: the fold never returned."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls = self.calls + 1
        self.last_input = x
        return self.bn(self.conv(x))


@pytest.mark.filterwarnings("ignore:The tensor attribute self.last_input was assigned during export")
@pytest.mark.parametrize("inplace", [False, True])
def test_a_forward_that_reassigns_its_buffers_is_folded_without_fx(inplace):
    model = randomise_statistics(_CountsItsCalls())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    calls_before = model.calls.item()
    folded, report = fold(model, x, inplace=inplace)
    assert [f.batchnorm for f in report.folds] == ["bn"] and "forward assigns a traced value to calls" in report.notes[0]
    assert all(type(value) is torch.Tensor for value in (*model._buffers.values(), *vars(model).values()) if isinstance(value, torch.Tensor))
    assert isinstance(model.calls, torch.Tensor) and model.calls.item() >= calls_before
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-4)


def test_uninitialised_lazy_modules_are_refused_before_anything_runs():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    for verify in (False, True):
        with pytest.raises(ValueError, match=r"lazy modules not yet initialised \(0\).*Run the model once"):
            fold(model, x, verify=verify)
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter)
    model(x)
    assert [f.layer for f in fold(model, x).report.folds] == ["0"]


def test_a_batchnorm_module_whose_tensors_a_function_call_reads_is_that_call():
    """F.batch_norm on the module's own statistics: one BatchNorm, folded, and no advice to delete the module."""

    class FunctionalBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bn = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.BatchNorm2d(4)

        def forward(self, x):
            bn = self.bn
            return F.batch_norm(F.conv2d(x, self.weight), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)

    model = randomise_statistics(FunctionalBatchNorm())
    _, report = fold(model, torch.randn(2, 3, 8, 8))
    assert len(report.folds) == 1 and not report.skips
    assert report.nodes_before["batchnorm"] == 1 and report.nodes_after["batchnorm"] == 0


class _UltralyticsConv(nn.Module):
    """ultralytics' Conv: conv, bn, SiLU (one module shared by every Conv, a class attribute); its fuse() deletes
    bn and sets ``forward = forward_fuse`` on the instance."""

    default_act = nn.SiLU()

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = self.default_act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class _PartlyFusedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _UltralyticsConv(3, 8), _UltralyticsConv(8, 8)
        del self.a.bn
        self.a.forward = self.a.forward_fuse

    def forward(self, x):
        y = torch.cat(list(self.a(x).chunk(2, 1)), 1)  # (a proxy iterated: fx fails, torch.export runs)
        return self.b(y)


def test_a_module_whose_forward_is_set_on_the_instance_does_not_break_the_export_route():
    """torch.export records the calls inside ``a`` under "conv", not "a.conv": bnfold looked "conv" up and
    raised AttributeError. Paths that do not name a module of the recorded class are dropped."""
    model = _PartlyFusedNet()
    model.b.bn.running_mean.uniform_(-1, 1)
    model.b.bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = fold(model, (x,))
    assert [(f.batchnorm, f.layer) for f in result.report.folds] == [("b.bn", "b.conv")]
    assert "torch.export.export" in result.report.notes[0] and result.report.verification.passed
    assert_same_outputs(outputs(model, (x,)), outputs(result.model, (x,)))


class _SplitBatchNorm2d(nn.BatchNorm2d):
    """timm's SplitBatchNorm2d (AdvProp, AugMix): auxiliary BatchNorms for parts of the training batch."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, num_splits=2):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        assert num_splits > 1, "Should have at least one aux BN layer (num_splits at least 2)"
        self.num_splits = num_splits
        self.aux_bn = nn.ModuleList([nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats) for _ in range(num_splits - 1)])

    def forward(self, input: torch.Tensor):  # noqa: A002 - timm's name
        if self.training:  # aux BN only relevant while training
            split_size = input.shape[0] // self.num_splits
            assert input.shape[0] == split_size * self.num_splits, "batch size must be evenly divisible by num_splits"
            split_input = input.split(split_size)
            x = [super().forward(split_input[0])]
            for i, a in enumerate(self.aux_bn):
                x.append(a(split_input[i + 1]))
            return torch.cat(x, dim=0)
        else:
            return super().forward(input)


def test_the_training_only_children_of_a_folded_batchnorm_go_with_it_and_the_report_says_so():
    """The folded SplitBatchNorm2d becomes nn.Identity, its aux_bn with it: the report listed aux_bn as a
    BatchNorm left in the model ("folded 1 of 2"), with advice to delete it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _SplitBatchNorm2d(8), nn.ReLU())
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    result = fold(model, (torch.randn(4, 3, 8, 8),))
    assert (len(result.report.folds), result.report.skips) == (1, [])
    assert result.report.nodes_after["batchnorm"] == 0 and not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert "1.aux_bn.0 (never called) is removed with 1, the folded BatchNorm it belongs to" in result.report.notes


class _PreActivation(nn.Module):
    """DPN-style pre-activation: a BatchNormAct2d (ReLU) on a sum, then a conv; or beside a conv on the sum."""

    def __init__(self, beside: bool):
        super().__init__()
        self.beside = beside
        self.bn, self.conv = BatchNormAct2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = x + 1
        return self.conv(x) + self.bn(x) if self.beside else self.conv(self.bn(x))


@pytest.mark.parametrize(
    "beside,words",
    [(False, "its input comes from `add`, and the module applies `bn.act` to its output before `conv` (Conv2d) reads it"),
     (True, "its output is read by the module's own `bn.act`, then `add`; none of them is a Conv")],
)  # fmt: skip
def test_a_batchnorm_act_left_names_what_reads_the_module_output(beside, words):
    """The reason named the module's own ``drop`` (an Identity) as the reader, never the act or what follows; it
    names the act alone, the child that changes the values."""
    torch.manual_seed(0)
    model = _PreActivation(beside)
    for _ in range(3):
        model(torch.randn(2, 8, 8, 8))
    result = fold(model.eval(), (torch.randn(2, 8, 8, 8),))
    (skip,) = result.report.skips
    assert words in skip.reason


class _NormBeforeAttention(nn.Module):
    """timm's MobileNetV4 hybrid block: a BatchNormAct2d made with apply_act=False (``drop`` and ``act`` are
    Identities) on a sum, read by the query's and the key's convs."""

    def __init__(self):
        super().__init__()
        self.norm = BatchNormAct2d(8, apply_act=False)
        self.query, self.key = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        x = self.norm(x + 1)
        return self.query(x) * self.key(x)


def test_a_batchnorm_act_whose_children_are_identities_is_left_for_its_readers_not_its_children():
    """The reason said the module applies ``norm.drop`` and ``norm.act`` (two Identities) before its readers."""
    torch.manual_seed(0)
    model = _NormBeforeAttention()
    for _ in range(3):
        model(torch.randn(2, 8, 8, 8))
    (skip,) = fold(model.eval(), (torch.randn(2, 8, 8, 8),)).report.skips
    assert "its output is read by `query` (Conv2d), `key` (Conv2d): a layer can absorb it only as the output's only reader" in skip.reason
    assert "drop" not in skip.reason and "act" not in skip.reason


def test_a_batchnorm_act_of_identities_folds_into_the_conv_after_it_checked_on_its_own():
    """Into the layer after it, the fold's own check took the layer's output for the BatchNorm's input and mapped it
    channel by channel: a RuntimeError (4 channels against 3) reached the user."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), BatchNormAct2d(3, apply_act=False), nn.Conv2d(3, 4, 3))
    for _ in range(3):
        model(torch.randn(2, 3, 10, 10))
    model.eval()
    data = torch.randn(2, 3, 10, 10)
    result = fold(model, (data,))
    (check,) = result.report.verification.folds
    assert result.report.folds[0].direction == "into-following" and check.status == "passed" and check.units < 4
    torch.testing.assert_close(result.model(data), model(data), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [torch.jit.script, lambda model: torch.jit.trace(model, torch.randn(1, 3, 8, 8))], ids=["script", "trace"])
def test_a_torchscript_module_is_refused_saying_what_to_fold(make):
    model = make(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    with pytest.raises(ModelNotTraceableError, match="is a TorchScript module .* fold the eager nn.Module it was made from"):
        fold(model, torch.randn(1, 3, 8, 8))


class _FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm's FrozenBatchNormAct2d (what ``freeze_batch_norm_2d`` makes of a BatchNormAct2d): the frozen
    multiply-add, then its own ``drop`` and ``act`` (ReLU)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def test_a_frozen_batchnorm_act_folds_in_the_module_tree_under_its_name():
    """Its multiply-add was folded in the graph, under fx's node name ("add_1"), and the result was a GraphModule."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _FrozenBatchNormAct2d(8), nn.Conv2d(8, 8, 3), _FrozenBatchNormAct2d(8)).eval()
    for bn in (model[1], model[3]):
        for name, low, high in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5), ("running_mean", -1, 1), ("running_var", 0.5, 2)):
            getattr(bn, name).uniform_(low, high, generator=generator)
    x = torch.randn(2, 3, 12, 12, generator=generator)
    result = fold(model, (x,))
    assert type(result.model) is nn.Sequential
    assert [(f.batchnorm, f.batchnorm_op, f.layer) for f in result.report.folds] == [("1", "_FrozenBatchNormAct2d", "0"), ("3", "_FrozenBatchNormAct2d", "2")]
    assert isinstance(result.model[1], nn.Sequential) and isinstance(result.model[1].act, nn.ReLU)
    assert [check.status for check in result.report.verification.folds] == ["passed", "passed"]
    assert_same_outputs(outputs(model, (x,)), outputs(result.model, (x,)))


class _IteratesItsInput(nn.Module):
    """fx cannot trace it (a Proxy cannot be iterated), so torch.export reads it; ``unused`` is never called (HF
    DPT's fusion_stage.layers.0.residual_layer1 with use_batch_norm_in_fusion_residual)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.unused = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        for _ in x:
            break
        return self.bn(self.conv(x))


def test_a_batchnorm_module_never_called_is_reported_when_export_reads_the_model():
    """torch.export lifts every parameter and buffer, read or not: the unused BatchNorm counted as one a function
    call reads, and vanished from the report ("folded 1 of 1")."""
    result = fold(randomise_statistics(_IteratesItsInput()), torch.randn(2, 3, 8, 8))
    assert "torch.export" in result.report.notes[0]
    assert [fold.batchnorm for fold in result.report.folds] == ["bn"]
    (skip,) = result.report.skips
    assert (skip.batchnorm, skip.code) == ("unused", "no-foldable-neighbour")
    assert "the example inputs do not take the path of forward() that calls it" in skip.reason


def test_weight_standardisation_is_no_batchnorm():
    """timm's StdConv2d (BiT) standardises its weight with F.batch_norm(weight, None, None, training=True): each was
    a BatchNorm "left" with batch statistics and the advice to train with track_running_stats=True."""
    from torch_architectures import BitStyleNet

    model = randomise_statistics(BitStyleNet())
    result = fold(model, torch.randn(2, 3, 8, 8))
    assert [fold.batchnorm for fold in result.report.folds] == ["head_norm"]
    assert [skip.batchnorm for skip in result.report.skips] == ["norm"]  # (before a ReLU: nothing to fold into)
    assert result.report.nodes_before["batchnorm"] == 2
    assert (
        "not counted as BatchNorms: the batch_norm calls in stem, conv normalise a value computed from parameters alone "
        "(weight standardisation, as timm's StdConv2d), no data"
    ) in result.report.notes


@pytest.mark.parametrize("given", [dict, list])
def test_example_inputs_as_a_dict_or_list_say_they_are_positional(given):
    """transformers' processors return a dict: passed as example_inputs, it was the forward's first argument and
    the error said only that tracing failed ('dict' object has no attribute 'shape')."""
    model = randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ModelNotTraceableError, match=rf"one {given.__name__} was given as its first: for keyword arguments"):
        fold(model, {"pixel_values": x} if given is dict else [x])


class _NormalisesABuffer(nn.Module):
    """Copies its conv output into a buffer, then normalises that with batch statistics: a BatchNorm of data."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("bank", torch.zeros(2, 4, 8, 8))

    def forward(self, x):
        self.bank.copy_(self.conv(x))
        return F.batch_norm(self.bank, None, None, training=True)


def test_a_batch_norm_of_a_buffer_is_counted_as_a_batchnorm():
    """Weight standardisation is told by what the batch_norm reads: parameters alone. A buffer, which a forward may
    fill with data, counted as a constant, and this batch_norm of the conv's output was noted as one."""
    result = fold(_NormalisesABuffer().eval(), torch.randn(2, 3, 8, 8), verify=False)
    assert [skip.code for skip in result.report.skips] == ["batch-statistics"]
    assert not any("weight standardisation" in note for note in result.report.notes)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 9)),
        (nn.ConvTranspose2d(4, 6, 3, stride=(2, 3), dilation=2, output_padding=(1, 2)), (2, 4, 5, 6)),
        (nn.ConvTranspose3d(4, 4, 2, stride=2, groups=4), (4, 3, 3, 3)),  # unbatched
    ],
)
def test_fold_check_rounding_scale_of_a_conv_transpose_is_its_own_forward_on_squared_tensors(layer, shape):
    # The check's rounding scale sqrt(sum (w x)^2 + c^2) computes a torch ConvTranspose directly, as its forward
    # would on the squared weight and bias (stride, output_padding, dilation, groups and unbatched input alike).
    from torch.func import functional_call

    from bnfold.torch_fold.verify import _squared_call

    data = torch.randn(shape, generator=torch.Generator().manual_seed(0)).square()
    bias_terms = np.random.default_rng(0).normal(size=layer.out_channels)
    squared = {"weight": layer.weight.detach().square(), "bias": torch.from_numpy(np.square(bias_terms)).float()}
    expected = functional_call(layer, squared, (data,))
    actual = _squared_call(layer, data, bias_terms)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


# --- models converted from ONNX by onnx2torch (its module patterns, replicated) ---------------------------------


class OnnxReshape(nn.Module):
    """onnx2torch's Reshape: the target shape is a tensor, read by value (a branch on it, then torch.Size of it),
    which neither torch.fx, torch.export nor TorchDynamo can follow."""

    def forward(self, data, shape):
        if torch.any(shape == 0):
            shape = [data.shape[i] if size == 0 else size for i, size in enumerate(shape)]
        return torch.reshape(data, torch.Size(shape))


class OnnxCopyIdentity(nn.Module):
    """onnx2torch's Identity: a copy."""

    def forward(self, x):
        return x.clone()


class OnnxBatchNorm(nn.Module):
    """onnx2torch's BatchNormalization when its tensors are not all the node's own initializers (the exporter
    deduplicates equal ones and reads them through Identity): F.batch_norm on the tensors it is given."""

    def forward(self, data, weight, bias, running_mean, running_var):
        return F.batch_norm(data, running_mean, running_var, weight, bias, training=self.training, eps=1e-5)


class OnnxShape(nn.Module):
    """onnx2torch's Shape: the input's shape as a tensor."""

    def forward(self, data):
        return torch.tensor(data.shape, device=data.device)


class FlattenedInside(nn.Module):
    """A Conv -> BN head ending in ``view(x.size(0), -1)`` with the reshape by value in its own forward: the module
    fx cannot trace through has a BatchNorm of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("rest", torch.tensor([-1]))

    def forward(self, y):
        y = self.bn(self.conv(y))
        return OnnxReshape.forward(self, y, torch.cat([torch.tensor(y.shape)[0:1], self.rest]))


class ConvertedWithReshapes(nn.Module):
    """As onnx2torch converts ``conv -> bn -> relu -> view(n, c, h, w) -> head -> fc``: shapes as tensors of values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.shape, self.reshape = OnnxShape(), OnnxReshape()
        self.register_buffer("dims", torch.tensor([8, 6, 6]))
        self.head = FlattenedInside()
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = self.reshape(y, torch.cat([self.shape(y)[0:1], self.dims]))
        return self.fc(self.head(y))


def test_modules_no_tracer_can_follow_are_kept_as_single_calls_and_the_rest_folds():
    """onnx2torch's Reshape takes the shape from a tensor's values: fx, export and Dynamo all failed, and the whole
    model was ModelNotTraceableError. Now fx keeps such modules as single calls (the last resort): the stem folds;
    a BatchNorm inside a module kept whole is reported, saying why."""
    model = randomise_statistics(ConvertedWithReshapes())
    inputs = (torch.randn(2, 3, 6, 6),)
    result = fold(model, inputs)

    assert [fold.batchnorm for fold in result.report.folds] == ["bn"]
    assert skip_codes(result.report) == {"head.bn": "no-foldable-neighbour"}
    assert "inside `head`, which torch.fx could not trace through" in result.report.skips[0].reason
    assert any("torch.fx could not trace through FlattenedInside, OnnxReshape" in note for note in result.report.notes)
    for x in (*inputs, torch.randn(5, 3, 6, 6)):
        assert_same_outputs(outputs(model, (x,)), outputs(result.model, (x,)))


def test_batchnorm_statistics_passed_in_through_copies_are_constants_to_fold():
    """onnx2torch's BatchNorm on deduplicated initializers: F.batch_norm on copies (``.clone()``) of buffers that
    several BatchNorms share. It was parameters-not-constant ("computed in forward()") for every one of them."""

    class Converted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
            self.bn1, self.bn2 = OnnxBatchNorm(), OnnxBatchNorm()
            self.copy = OnnxCopyIdentity()
            generator = torch.Generator().manual_seed(0)
            self.register_buffer("ones", torch.ones(4))  # weight of both, read through copies
            self.register_buffer("zeros", torch.zeros(4))
            for index in (1, 2):
                self.register_buffer(f"mean{index}", torch.randn(4, generator=generator))
                self.register_buffer(f"var{index}", torch.rand(4, generator=generator) + 0.5)

        def forward(self, x):
            y = self.bn1(self.conv1(x), self.copy(self.ones), self.copy(self.zeros), self.mean1, self.var1)
            return self.bn2(self.conv2(torch.relu(y)), self.copy(self.ones), self.zeros, self.copy(self.mean2), self.var2)

    model = Converted().eval()
    inputs = (torch.randn(2, 3, 9, 9),)
    result = fold(model, inputs)

    assert len(result.report.folds) == 2 and not result.report.skips
    # Each fold takes its F.batch_norm and the copies only it reads: 3 + 3 calls.
    assert result.report.nodes_before["total"] - result.report.nodes_after["total"] == 6
    assert not any(node.target == "clone" for node in result.model.graph.nodes)
    for x in (*inputs, torch.randn(3, 3, 9, 9)):
        assert_same_outputs(outputs(model, (x,)), outputs(result.model, (x,)))


def test_a_copy_passed_for_two_statistics_counts_once():
    """One clone as both weight and bias of an F.batch_norm: the fold takes two calls, not three."""

    class SharedCopy(nn.Module):
        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("ones", torch.ones(4))
            self.register_buffer("mean", torch.randn(4, generator=generator))
            self.register_buffer("var", torch.rand(4, generator=generator) + 0.5)

        def forward(self, x):
            affine = self.ones.clone()
            return F.batch_norm(self.conv(x), self.mean, self.var, affine, affine, training=False)

    model = SharedCopy().eval()
    inputs = (torch.randn(2, 3, 9, 9),)
    result = fold(model, inputs)

    assert len(result.report.folds) == 1
    assert result.report.nodes_before["total"] - result.report.nodes_after["total"] == 2
    assert_same_outputs(outputs(model, inputs), outputs(result.model, inputs))


class ClonedStatisticsChanged(nn.Module):
    """F.batch_norm on a copy of the running mean that forward changes in place first."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4, generator=generator))
        self.register_buffer("var", torch.rand(4, generator=generator) + 0.5)

    def forward(self, x):
        mean = self.mean.clone()
        mean.add_(10.0)
        return F.batch_norm(self.conv(x), mean, self.var, training=False)


class TrainingCallSharesStatistics(nn.Module):
    """A training-mode F.batch_norm updates, in place at every call, the running statistics an eval-mode one reads
    with another weight."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        for name in ("weight", "weight2", "bias", "mean"):
            self.register_buffer(name, torch.randn(4, generator=generator))
        self.register_buffer("var", torch.rand(4, generator=generator) + 0.5)

    def forward(self, x):
        updating = F.batch_norm(self.conv2(x), self.mean, self.var, self.weight2, self.bias, training=True, momentum=0.5)
        return F.batch_norm(self.conv(x), self.mean, self.var, self.weight, self.bias, training=False) + updating


@pytest.mark.parametrize("build", [ClonedStatisticsChanged, TrainingCallSharesStatistics])
def test_statistics_that_forward_changes_are_never_folded(build):
    """A copy changed in place was folded as the buffer it copies (verify=False returned a model off by 18); a call
    sharing statistics with a training-mode call was folded once the calls were grouped by all four tensors."""
    model = build().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pristine = copy.deepcopy(model)
    result = fold(model, (x,), verify=False)

    assert not result.report.folds
    for _ in range(2):  # (the training-mode call changes the statistics at each call, in both)
        assert_same_outputs(outputs(pristine, (x,)), outputs(result.model, (x,)))


class _AliasedBatchNorm(nn.Module):
    """A BatchNorm registered under two names, called through the second."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.bn_alias = self.bn

    def forward(self, x):
        return self.bn_alias(self.conv(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_a_batchnorm_registered_under_two_names_is_removed_under_both(inplace):
    """Only the first name was replaced: the folded model normalised twice, a VerificationError on a foldable model,
    and with verify=False a model 41% off, returned silently."""
    torch.manual_seed(0)
    model = _AliasedBatchNorm()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    data = torch.randn(3, 3, 9, 9)
    expected = model(data).detach()
    for verify in (False, True):
        folded, report = fold(model if inplace and verify else copy.deepcopy(model), (torch.randn(2, 3, 8, 8),), verify=verify, inplace=inplace)
        assert isinstance(folded.bn, nn.Identity) and folded.bn_alias is folded.bn and len(report.folds) == 1
        torch.testing.assert_close(folded(data), expected, rtol=1e-5, atol=1e-5)


class _ChannelAttentionByBatchNormWeight(nn.Module):
    """NAM's channel attention: the BatchNorm's own weight, normalised, weighs its output's channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        weight = self.bn.weight.abs() / self.bn.weight.abs().sum()
        return torch.sigmoid(y * weight.view(1, -1, 1, 1))


def test_a_batchnorm_whose_weight_forward_reads_stays_saying_where():
    """Folded and replaced by nn.Identity, the BatchNorm took the weight forward() reads: the folded model raised
    AttributeError (a raw exception out of verification; verify=False returned a model that cannot run)."""
    torch.manual_seed(0)
    model = _ChannelAttentionByBatchNormWeight()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    for verify in (True, False):
        folded, report = fold(model, (torch.randn(2, 3, 8, 8),), verify=verify)
        (skip,) = report.skips
        assert not report.folds and skip.code == "read-elsewhere" and "reads `bn.weight` outside the module's call" in skip.reason
        data = torch.randn(3, 3, 9, 9)
        torch.testing.assert_close(folded(data), model(data))


def test_a_conv_whose_weight_is_a_buffer_folds_checked_on_its_own():
    """Frozen weights, registered as a buffer: the fold's own check squared the layer's parameters alone and raised
    KeyError: 'weight'."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    weight = conv.weight.detach().clone()
    del conv.weight
    conv.register_buffer("weight", weight)
    model = nn.Sequential(conv, nn.BatchNorm2d(8))
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    folded, report = fold(model, (torch.randn(2, 3, 8, 8),))
    (check,) = report.verification.folds
    assert check.status == "passed" and check.units < 4 and "weight" in dict(folded[0].named_buffers())
    data = torch.randn(3, 3, 9, 9)
    torch.testing.assert_close(folded(data), model(data), rtol=1e-5, atol=1e-5)


def test_models_fold_cannot_use_are_refused_saying_what_to_do():
    """A legacy weight_norm (deepcopy's RuntimeError), a model on the meta device (NotImplementedError from the
    plan) and a Dropout alone in train mode (blamed on BatchNorm's batch statistics)."""
    weight_normed = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    torch.nn.utils.weight_norm(weight_normed[0])
    with pytest.raises(ValueError, match=r"Sequential cannot be copied \(RuntimeError: .*remove_weight_norm.* inplace=True"):
        fold(weight_normed, torch.randn(2, 3, 8, 8))
    with torch.device("meta"):
        on_meta = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(ValueError, match=r"tensors on the meta device \(0.weight, 0.bias, 1.weight, \.\.\.\), which hold no values"):
        fold(on_meta, torch.randn(2, 3, 8, 8, device="meta"), verify=False)
    dropout = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.5), nn.BatchNorm2d(8)).eval()
    dropout[1].train()
    with pytest.raises(ValueError, match=r"training mode \(1\): Dropout zeroes values at random there"):
        fold(dropout, torch.randn(2, 3, 8, 8))


class _TiedConvolutions(nn.Module):
    """Two convolutions sharing one weight (tied parameters), each called once, each before its BatchNorm."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.b1, self.b2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.b2(self.c2(self.b1(self.c1(x)).relu()))


def test_a_layer_with_a_tied_weight_is_left_saying_so_not_that_it_is_called_twice():
    """Each convolution is called once; the reason said "`c1` is called 2 times"."""
    report = fold(_TiedConvolutions().eval(), torch.randn(2, 3, 8, 8)).report
    reasons = {skip.batchnorm: skip.reason for skip in report.skips}
    assert set(reasons) == {"b1", "b2"} and "`c1`'s weight or bias is also read elsewhere (2 reads" in reasons["b1"]
    assert not any("is called" in reason for reason in reasons.values())
    reused = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    model = nn.Sequential(reused[0], reused[1], reused[0]).eval()
    (skip,) = fold(model, torch.randn(2, 3, 8, 8)).report.skips
    assert "`0` is called 2 times" in skip.reason


class _StatisticsUpdatedInForward(nn.Module):
    """An exponential average of the running mean, updated in place in forward() (in eval mode too)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        self.bn.running_mean.mul_(0.9).add_(0.1 * y.mean((0, 2, 3)).detach())
        return self.bn(y)


def test_a_batchnorm_whose_statistics_forward_updates_is_left_saying_so():
    """It was left as track_running_stats=False, which it is not."""
    (skip,) = fold(_StatisticsUpdatedInForward().eval(), torch.randn(2, 3, 8, 8)).report.skips
    assert skip.code == "parameters-not-constant" and "forward() changes it before the call" in skip.reason
    assert "track_running_stats" not in skip.reason


def test_a_model_that_fails_on_the_example_inputs_is_said_to():
    """Inputs of 4 channels for a 3-channel convolution: the error opened with fx's "the traced graph computes other
    outputs than the model", the model's own error buried in export's part of it."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(ModelNotTraceableError, match=r"^Sequential fails on the example inputs \(RuntimeError: Given groups=1.*give inputs it accepts"):
        fold(model, torch.randn(2, 4, 8, 8))


def test_a_hooked_dropout_between_the_layer_and_the_batchnorm_is_named_as_the_reason():
    """The Dropout's hook keeps it from passing the values through: the reason said no Conv was next to the BatchNorm."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.1), nn.BatchNorm2d(8)).eval()
    model[1].register_forward_hook(lambda module, inputs, output: None)
    (skip,) = fold(model, torch.randn(2, 3, 8, 8)).report.skips
    assert skip.code == "hooked-module" and "`1` has hooks" in skip.reason and "would see the normalised values instead" in skip.reason


class _ScriptedBlock(nn.Module):
    """An eager model holding a scripted Conv -> BatchNorm block, then its own pair."""

    def __init__(self):
        super().__init__()
        self.block = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval())
        self.conv, self.bn = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.block(x)))


def test_a_batchnorm_inside_a_scripted_submodule_is_reported_left():
    """It was neither folded nor listed: "folded 1 of 1" for a model holding two."""
    report = fold(_ScriptedBlock().eval(), torch.randn(2, 3, 8, 8)).report
    (skip,) = report.skips
    assert len(report.folds) == 1 and report.nodes_before["batchnorm"] == 2
    assert skip.batchnorm == "block.1" and "inside `block`, a TorchScript module" in skip.reason


class _SharedStatistics(nn.Module):
    """Two Conv -> BatchNorm branches whose BatchNorms share one running_mean tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.b[1].running_mean = self.a[1].running_mean

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_batchnorms_sharing_statistics_are_each_reported_left():
    """Decided together, they were reported as one skip, of the first, said to be "called 2 times"; the other was
    neither folded nor left."""
    report = fold(_SharedStatistics().eval(), torch.randn(2, 3, 8, 8)).report
    assert [skip.batchnorm for skip in report.skips] == ["a.1", "b.1"] and not report.folds
    assert all("`a.1`, `b.1` share their statistics" in skip.reason for skip in report.skips)
