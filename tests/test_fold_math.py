"""The shared fold algebra: every layout against the layer computed in float64 by torch, the refusals,
the single rounding, and folds whose result the layer's dtype cannot hold (refused by both front-ends)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from onnx_models import fast_path_agrees, initializer, make_model
from torch import nn

import bnfold
from bnfold.fold_math import (
    ChannelAffine,
    FoldOverflowError,
    UnfoldableStatisticsError,
    WeightLayout,
    batchnorm_affine,
    check_fits,
    fold_into_inputs,
    fold_into_outputs,
    fold_many_into_outputs,
    round_to_dtype,
)

RNG = np.random.default_rng(0)


def affine(channels: int) -> ChannelAffine:
    return ChannelAffine(RNG.uniform(0.5, 1.5, channels), RNG.normal(0, 0.5, channels))


def per_channel(a: ChannelAffine, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * torch.from_numpy(a.scale).view(shape) + torch.from_numpy(a.shift).view(shape)


def t(array):
    return torch.from_numpy(np.ascontiguousarray(array))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv_output_fold_matches_conv_then_affine(groups):
    weight, bias, a = RNG.normal(size=(6, 6 // groups, 3, 3)), RNG.normal(size=6), affine(6)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    w, b = fold_into_outputs(weight, bias, a, WeightLayout("conv", groups))
    expected = per_channel(a, F.conv2d(x, t(weight), t(bias), groups=groups))
    torch.testing.assert_close(F.conv2d(x, t(w), t(b), groups=groups), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_transpose_output_fold_uses_the_per_group_output_axis(groups):
    weight, a = RNG.normal(size=(6, 9 // groups, 3, 3)), affine(9)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    w, b = fold_into_outputs(weight, None, a, WeightLayout("conv_transpose", groups))
    expected = per_channel(a, F.conv_transpose2d(x, t(weight), groups=groups))
    torch.testing.assert_close(F.conv_transpose2d(x, t(w), t(b), groups=groups), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_input_fold_matches_affine_then_unpadded_conv(groups):
    weight, bias, a = RNG.normal(size=(6, 6 // groups, 3, 3)), RNG.normal(size=6), affine(6)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    w, b = fold_into_inputs(weight, bias, a, WeightLayout("conv", groups))
    expected = F.conv2d(per_channel(a, x), t(weight), t(bias), groups=groups)
    torch.testing.assert_close(F.conv2d(x, t(w), t(b), groups=groups), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["matrix_in_out", "matrix_out_in"])
def test_matrix_folds_both_directions(kind):
    x = torch.randn(4, 5, dtype=torch.float64)

    def apply(weight, bias):
        y = x @ t(weight) if kind == "matrix_in_out" else x @ t(weight).T
        return y if bias is None else y + t(bias)

    weight = RNG.normal(size=(5, 3) if kind == "matrix_in_out" else (3, 5))
    after, before = affine(3), affine(5)
    w, b = fold_into_outputs(weight, None, after, WeightLayout(kind))
    torch.testing.assert_close(apply(w, b), per_channel(after, apply(weight, None)), atol=1e-12, rtol=1e-12)
    w, b = fold_into_inputs(weight, None, before, WeightLayout(kind))
    expected = per_channel(before, x) @ (t(weight) if kind == "matrix_in_out" else t(weight).T)
    torch.testing.assert_close(apply(w, b), expected, atol=1e-12, rtol=1e-12)


def test_batchnorm_affine_is_the_eval_formula_in_float64():
    gamma, beta, mean, var = (RNG.uniform(0.5, 1.5, 4).astype(np.float32) for _ in range(4))
    a = batchnorm_affine(gamma, beta, mean, var, 1e-3)
    assert a.scale.dtype == np.float64
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = F.batch_norm(x, t(mean).double(), t(var).double(), t(gamma).double(), t(beta).double(), False, 0.0, 1e-3)
    torch.testing.assert_close(per_channel(a, x), expected, atol=1e-14, rtol=1e-14)
    plain = batchnorm_affine(None, None, mean, var, 1e-3)  # affine=False
    np.testing.assert_allclose(plain.scale, 1 / np.sqrt(var.astype(np.float64) + 1e-3))


@pytest.mark.parametrize(
    "field,value,words",
    [("var", -1.0, "negative"), ("var", 0.0, "not positive"), ("mean", np.nan, "NaN"), ("gamma", np.inf, "Inf")],
)
def test_unfoldable_statistics_say_why_and_where(field, value, words):
    params = {name: np.ones(4) for name in ("gamma", "beta", "mean", "var")}
    params[field] = params[field].copy()
    params[field][3] = value
    eps = 0.0 if words == "not positive" else 1e-5
    with pytest.raises(UnfoldableStatisticsError, match=words) as error:
        batchnorm_affine(params["gamma"], params["beta"], params["mean"], params["var"], eps)
    assert "channel 3" in str(error.value)


def test_bfloat16_is_rounded_once_not_through_float32():
    # Just above the midpoint between the bfloat16 neighbours 1 and 1 + 2^-7: nearest is 1 + 2^-7.
    # float32 rounds it onto the midpoint first, and then ties-to-even gives 1 (the double-rounding error).
    x = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30)])
    assert x.astype(ml_dtypes.bfloat16)[0] == 1.0  # what a plain cast does
    np.testing.assert_array_equal(round_to_dtype(x, ml_dtypes.bfloat16).astype(np.float64), [1 + 2**-7, -(1 + 2**-7)])


def test_bfloat16_rounding_is_nearest_on_random_values():
    x = RNG.standard_normal(100_000) * np.exp(RNG.uniform(-30, 30, 100_000))
    rounded = round_to_dtype(x, ml_dtypes.bfloat16)
    bits = rounded.view(np.uint16).astype(np.int32)
    neighbours = [(bits + step).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64) for step in (-1, 1)]
    error = np.abs(x - rounded.astype(np.float64))
    assert not any(np.any(np.abs(x - n) < error) for n in neighbours)


def test_folds_round_once_to_the_weight_dtype():
    weight = RNG.normal(size=(4, 2, 3, 3)).astype(np.float16)
    a = affine(4)
    w, b = fold_into_outputs(weight, None, a, WeightLayout("conv"))
    assert w.dtype == np.float16 and b.dtype == np.float16
    exact = weight.astype(np.float64) * a.scale[:, None, None, None]
    np.testing.assert_array_equal(w, exact.astype(np.float16))


def test_folding_many_layers_at_once_gives_each_layer_fold_bit_for_bit():
    """Batched (leading output channels, per-channel or no bias) and one-by-one layers, mixed dtypes."""
    layers = []
    for dtype in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16):
        for kind, shape, groups in [
            ("conv", (6, 2, 3, 3), 3),
            ("conv", (4, 4, 1, 1), 1),
            ("matrix_out_in", (5, 7), 1),
            ("conv_transpose", (4, 3, 2, 2), 2),
            ("matrix_in_out", (7, 5), 1),
        ]:
            layout = WeightLayout(kind, groups)
            channels = layout.out_channels(shape)
            weight = RNG.normal(size=shape).astype(dtype)
            for bias in (None, RNG.normal(size=channels).astype(dtype)):
                layers.append((weight, bias, affine(channels), layout))
    # A Gemm-style bias broadcast over rows goes one by one.
    layers.append((RNG.normal(size=(5, 7)).astype(np.float32), RNG.normal(size=(3, 5)).astype(np.float32), affine(5), WeightLayout("matrix_out_in")))
    for layer, (weight, bias) in zip(layers, fold_many_into_outputs(layers), strict=True):
        expected_weight, expected_bias = fold_into_outputs(*layer)
        for ours, expected in ((weight, expected_weight), (bias, expected_bias)):
            assert ours.dtype == expected.dtype and ours.shape == expected.shape
            assert ours.tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16])
def test_check_fits_stops_exactly_where_rounding_reaches_inf(dtype):
    largest = float(ml_dtypes.finfo(dtype).max)
    below_inf = np.nextafter(largest + (largest - float(np.nextafter(dtype(largest), dtype(0)))) / 2, 0)
    assert np.isfinite(round_to_dtype(np.array([below_inf]), dtype)).all()
    check_fits(np.array([1.0, -below_inf]), dtype, "weight")
    with np.errstate(over="ignore"):
        assert not np.isfinite(round_to_dtype(np.array([np.nextafter(below_inf, np.inf)]), dtype)).all()
    with pytest.raises(FoldOverflowError, match=f"weight reaches .*, past the largest {np.dtype(dtype).name}"):
        check_fits(np.array([1.0, -np.nextafter(below_inf, np.inf)]), dtype, "weight")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_check_fits_refuses_nan_and_inf_even_in_float64(value):
    with pytest.raises(FoldOverflowError, match="bias has NaN or Inf values"):
        check_fits(np.array([0.0, value]), np.float64, "bias")


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_folds_refuse_a_result_the_dtype_cannot_hold(dtype):
    weight, layout = np.full((4, 4, 1, 1), 2.0).astype(dtype), WeightLayout("conv")
    huge = ChannelAffine(np.full(4, 1e39), np.zeros(4))
    name = np.dtype(dtype).name
    for fold in (fold_into_outputs, fold_into_inputs):
        with pytest.raises(FoldOverflowError, match=f"weight reaches 2e\\+39, past the largest {name}"):
            fold(weight, None, huge, layout)
    with pytest.raises(FoldOverflowError, match=f"weight reaches 2e\\+39, past the largest {name}"):
        fold_many_into_outputs([(weight, None, huge, layout)])
    shifted = ChannelAffine(np.ones(4), np.full(4, 1e39))  # the weight fits, the bias does not
    with pytest.raises(FoldOverflowError, match="bias reaches 1e\\+39"):
        fold_into_outputs(weight, None, shifted, layout)


# A weight that the BatchNorm below (scale 1e6 on channel 1) takes past the dtype's largest value.
OVERFLOWING_WEIGHT = {"float16": 1.0, "bfloat16": 2.0**116}


def _overflowing_conv_bn(elem_type: int, dtype) -> object:
    """Conv -> BN whose zero variance (eps 1e-12) scales channel 1 of the weight by 1e6."""
    weight = np.full((2, 2, 1, 1), OVERFLOWING_WEIGHT[np.dtype(dtype).name])
    parameters = {"s": [1.0, 1.0], "b": [0.0, 0.0], "m": [0.0, 0.0], "v": [1.0, 0.0]}
    inits = [initializer("W", weight.astype(dtype))]
    inits += [initializer(name, np.array(values).astype(dtype)) for name, values in parameters.items()]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        helper.make_node("BatchNormalization", ["y", "s", "b", "m", "v"], ["z"], name="bn", epsilon=1e-12),
    ]
    return make_model(nodes, [("x", [1, 2, 3, 3])], ["z"], inits, elem_type=elem_type)


@pytest.mark.parametrize("elem_type,dtype", [(TensorProto.FLOAT16, np.float16), (TensorProto.BFLOAT16, ml_dtypes.bfloat16)])
@pytest.mark.parametrize("as_path", [False, True])
def test_onnx_fold_that_overflows_is_skipped_with_or_without_verification(tmp_path, elem_type, dtype, as_path):
    model = _overflowing_conv_bn(elem_type, dtype)
    assert not fast_path_agrees(model)  # the fast path declines; the pass refuses and says why
    source = model
    if as_path:
        source = tmp_path / "model.onnx"
        source.write_bytes(model.SerializeToString())
    for verify in (False, True):
        if verify and elem_type == TensorProto.BFLOAT16:
            continue  # onnxruntime has no bfloat16 Conv on the CPU; nothing is folded to verify anyway
        _, report = bnfold.fold_onnx(source, verify=verify)
        assert not report.folds and [skip.code for skip in report.skips] == ["fold-overflows"]
        reason = report.skips[0].reason
        largest = f"reaches {OVERFLOWING_WEIGHT[np.dtype(dtype).name] * 1e6:.4g}"
        assert "into conv" in reason and np.dtype(dtype).name in reason and largest in reason and "wider dtype" in reason


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("verify", [False, True])
def test_torch_fold_that_overflows_is_skipped(dtype, verify):
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2, eps=1e-12)).eval()
    with torch.no_grad():
        model[0].weight.fill_(OVERFLOWING_WEIGHT[str(dtype).removeprefix("torch.")])
        model[1].running_var[1] = 0.0
    model = model.to(dtype)
    result = bnfold.fold(model, (torch.ones(1, 2, 3, 3, dtype=dtype),), verify=verify)
    assert not result.report.folds and [skip.code for skip in result.report.skips] == ["fold-overflows"]
    reason = result.report.skips[0].reason
    largest = f"reaches {OVERFLOWING_WEIGHT[str(dtype).removeprefix('torch.')] * 1e6:.4g}"
    assert "`0`" in reason and str(dtype).removeprefix("torch.") in reason and largest in reason
    assert torch.isfinite(result.model[0].weight).all() and isinstance(result.model[1], nn.BatchNorm2d)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("divisor", [1.0, 0.75, 0.0])
def test_parameter_check_reads_the_exact_weight_a_block_at_a_time_with_the_same_result(dtype, divisor):
    """exact_fold gives a weight whose output channels lead as ScaledRows, computed block by block when
    compared; the comparison is the one a float64 copy of the whole exact weight gives, worst element,
    channel and magnitude included, after a Gemm's alpha too (0: infinitely far)."""
    from bnfold.fold_math import ScaledRows, exact_fold
    from bnfold.verification import compare_parameters

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((300, 40, 3, 3)).astype(dtype)  # several blocks of rows
    affine = ChannelAffine(rng.uniform(0.5, 2.0, 300), rng.standard_normal(300))
    layout = WeightLayout("conv")
    lazy = exact_fold(weight, None, affine, layout, into_outputs=True)
    assert isinstance(lazy.weight, ScaledRows)
    whole = weight.astype(np.float64) * affine.scale[:, None, None, None]
    if divisor != 1.0:
        lazy = type(lazy)(lazy.weight.divided(divisor), lazy.bias, lazy.bias_terms)
        with np.errstate(divide="ignore", invalid="ignore"):
            whole = whole / divisor
    folded = np.asarray(whole, dtype)
    folded[217, 5, 1, 2] = folded[217, 5, 1, 2] * 1.01  # one element well off
    eager = type(lazy)(whole, lazy.bias, lazy.bias_terms)
    bias = np.asarray(lazy.bias, dtype)
    assert compare_parameters(lazy, folded, bias, layout) == compare_parameters(eager, folded, bias, layout)
    if divisor:
        assert compare_parameters(lazy, folded, bias, layout).channel == 217
