"""bnfold.quantization: every figure against a direct numpy computation (or a hand computation) on
hand-built layers, with the degenerate channels: variance 0 (+ eps), γ = 0, huge γ."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from bnfold.fold_math import WeightLayout, batchnorm_affine, fold_into_outputs
from bnfold.quantization import (
    INT8_LOSS_FLAG_DB,
    NAMED_CHANNELS,
    ChannelStatistics,
    RowFigures,
    check_target_dtype,
    format_table,
    int8_sqnr_db,
    measure_fold,
    named_channels,
    output_channel_rows,
    statistics_estimate,
)

EPS = 1e-5


def direct_sqnr(rows: list[np.ndarray], per_channel: bool) -> float:
    """The median over channels of 10 log10(signal / noise), one channel at a time, step from the channel or
    from the whole tensor."""
    tensor_max = max(float(np.abs(row).max()) for row in rows)
    figures = []
    for row in rows:
        row = row.astype(np.float64)
        if not np.any(row):
            continue  # an all-zero channel quantizes exactly: left out
        step = (float(np.abs(row).max()) if per_channel else tensor_max) / 127
        quantized = np.clip(np.round(row / step), -127, 127) * step
        noise = float(np.sum((row - quantized) ** 2))
        figures.append(math.inf if noise == 0 else 10 * math.log10(float(np.sum(row**2)) / noise))
    return float(np.median(figures)) if figures else math.inf


def conv_layer():
    """A Conv (6 out, 3 in, 3x3) and a BatchNorm with an ordinary channel 0, var 0 in channel 1, γ 0 in
    channel 2, a huge γ in channel 3 and ordinary channels 4, 5."""
    rng = np.random.default_rng(7)
    weight = rng.normal(0, 0.2, size=(6, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=6).astype(np.float32)
    gamma = np.array([1.0, 0.8, 0.0, 300.0, 1.2, 0.9], np.float32)
    beta = np.array([0.1, -0.2, 0.3, 0.0, 0.05, -0.1], np.float32)
    mean = np.array([0.5, 0.1, -0.3, 0.2, 0.0, 1.0], np.float32)
    var = np.array([1.0, 0.0, 2.0, 0.5, 0.7, 1.5], np.float32)
    return weight, bias, gamma, beta, mean, var


def test_rows_are_output_channels_in_every_layout():
    conv = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    assert np.array_equal(output_channel_rows(conv, WeightLayout("conv")), conv.reshape(4, 6))
    # ConvTranspose, 2 groups: weight (C_in 4, C_out/g 3, k 2); output channel g*3 + o reads weight[g*2:(g+1)*2, o].
    transposed = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    rows = output_channel_rows(transposed, WeightLayout("conv_transpose", groups=2))
    for group in range(2):
        for out in range(3):
            assert np.array_equal(rows[group * 3 + out], transposed[group * 2 : group * 2 + 2, out].reshape(-1))
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(output_channel_rows(matrix, WeightLayout("matrix_in_out")), matrix.T)
    assert np.array_equal(output_channel_rows(matrix, WeightLayout("matrix_out_in")), matrix)


def test_int8_sqnr_by_hand():
    # Per-tensor step 1/127. Channel 0: 1 -> 127 steps exactly, 0.5 -> 63.5 rounds to 64 (even), error 0.5/127.
    # Channel 1: 0.01 -> 1.27 -> 1 step, 0.02 -> 2.54 -> 3 steps.
    rows = np.array([[1.0, 0.5], [0.01, 0.02]])
    channel0 = 10 * math.log10((1 + 0.25) / (0.5 / 127) ** 2)
    channel1 = 10 * math.log10((0.01**2 + 0.02**2) / ((0.01 - 1 / 127) ** 2 + (0.02 - 3 / 127) ** 2))
    assert int8_sqnr_db(rows, RowFigures.of(rows), per_channel=False) == pytest.approx((channel0 + channel1) / 2, rel=1e-12)
    # Per-channel, channel 1's step is 0.02/127: 0.01 -> 63.5 steps -> 64, 0.02 exact.
    per_channel1 = 10 * math.log10((0.01**2 + 0.02**2) / (0.01 - 64 * 0.02 / 127) ** 2)
    assert int8_sqnr_db(rows, RowFigures.of(rows), per_channel=True) == pytest.approx((channel0 + per_channel1) / 2, rel=1e-12)


def test_exact_and_all_zero_tensors():
    exact = np.array([[127.0, -1.0], [2.0, 0.0]])  # step 1: every value an integer
    assert int8_sqnr_db(exact, RowFigures.of(exact), per_channel=False) == math.inf
    zeros = np.zeros((3, 4))
    for per_channel in (False, True):
        assert int8_sqnr_db(zeros, RowFigures.of(zeros), per_channel) == math.inf
    assert RowFigures.of(zeros).spread == 1.0 and RowFigures.of(zeros).range == (0.0, 0.0)


def test_folded_conv_with_degenerate_channels_matches_direct_numpy():
    weight, bias, gamma, beta, mean, var = conv_layer()
    layout = WeightLayout("conv")
    affine = batchnorm_affine(gamma, beta, mean, var, EPS)
    folded, folded_bias = fold_into_outputs(weight, bias, affine, layout)
    result = measure_fold(
        weight, folded, layout, named_channels(affine.scale, gamma, mean, var, EPS),
        bias_before=bias, bias_after=folded_bias, batchnorm="bn", layer="conv",
    )  # fmt: skip
    before64, after64 = weight.astype(np.float64), folded.astype(np.float64)
    assert result.range_before == (before64.min(), before64.max())
    assert result.range_after == (after64.min(), after64.max())
    before_max = np.abs(before64).reshape(6, -1).max(axis=1)
    after_max = np.abs(after64).reshape(6, -1).max(axis=1)
    assert result.channel_spread_before == before_max.max() / np.median(before_max)
    assert result.channel_spread_after == after_max.max() / np.median(after_max)
    rows_before, rows_after = list(before64.reshape(6, -1)), list(after64.reshape(6, -1))
    # float32 weights are measured in float32 (steps and sums of squares round there): within 1e-6 of float64.
    assert result.int8_per_tensor_db_before == pytest.approx(direct_sqnr(rows_before, per_channel=False), rel=1e-6)
    assert result.int8_per_tensor_db == pytest.approx(direct_sqnr(rows_after, per_channel=False), rel=1e-6)
    assert result.int8_per_channel_db == pytest.approx(direct_sqnr(rows_after, per_channel=True), rel=1e-6)
    # float64 weights are measured in float64, to the last bits.
    wide = measure_fold(before64, after64, layout, result.channels)
    assert wide.int8_per_tensor_db == pytest.approx(direct_sqnr(rows_after, per_channel=False), rel=1e-12)
    assert wide.int8_per_channel_db == pytest.approx(direct_sqnr(rows_after, per_channel=True), rel=1e-12)
    assert result.int8_db_lost == result.int8_per_tensor_db_before - result.int8_per_tensor_db
    # Channel 3 (γ 300: scale 300/sqrt(0.5)) sets the per-tensor step: the others keep a level or two.
    assert result.int8_db_lost > 30 and result.flags == ["int8"]
    assert result.int8_per_channel_db > 40  # each channel with its own step is as good as ever
    # The γ = 0 channel folds to zeros: left out of the SQNR, one of the six channel ranges (0).
    assert not np.any(folded[2]) and after_max[2] == 0
    # Named: the largest |scale| first, with the channel's own statistics.
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + EPS)
    assert [c.channel for c in result.channels] == list(np.argsort(-np.abs(scale))[:NAMED_CHANNELS]) == [3, 1, 4]
    assert result.channels[0] == ChannelStatistics(3, scale[3], 300.0, float(mean[3]), 0.5, EPS)
    # Channel 1: variance 0, so the scale is γ / sqrt(eps).
    assert result.channels[1].scale == pytest.approx(float(gamma[1]) / math.sqrt(EPS), rel=1e-15)
    assert result.channels[1].variance == 0.0
    assert result.target is None


def test_an_ordinary_fold_is_not_flagged():
    weight, bias, _, beta, mean, var = conv_layer()
    gamma = np.array([1.0, 0.9, 1.1, 1.05, 0.95, 1.0], np.float32)
    var = np.array([1.0, 0.8, 1.2, 0.9, 1.1, 1.0], np.float32)
    affine = batchnorm_affine(gamma, beta, mean, var, EPS)
    folded, _ = fold_into_outputs(weight, bias, affine, WeightLayout("conv"))
    result = measure_fold(weight, folded, WeightLayout("conv"), named_channels(affine.scale))
    assert abs(result.int8_db_lost) < INT8_LOSS_FLAG_DB and result.flags == []
    assert result.channels[0].gamma is None  # a bare scale names no statistics


def test_float16_overflow_and_values_below_the_normal_range():
    weight = np.array([[0.5, -0.25], [0.1, 0.2], [1e-3, 2e-3]], np.float32)  # (out 3, in 2), Linear layout
    gamma = np.array([1e3, 1.0, 1e-3], np.float32)
    var = np.array([0.0, 1.0, 1.0], np.float32)
    affine = batchnorm_affine(gamma, np.zeros(3), np.zeros(3), var, EPS)
    layout = WeightLayout("matrix_out_in")
    folded, folded_bias = fold_into_outputs(weight, None, affine, layout)
    result = measure_fold(weight, folded, layout, named_channels(affine.scale), bias_after=folded_bias, target_dtype="float16")
    values = np.concatenate([folded.reshape(-1), folded_bias]).astype(np.float64)
    # Channel 0: 1e3/sqrt(1e-5) = 316228 times 0.5 and 0.25: past 65504. Channel 2: 1e-3 * 1e-3, 2e-3: below 6.1e-5.
    assert result.target.overflow == np.count_nonzero(np.abs(values) > 65504) == 2
    smallest_normal = float(ml_dtypes.finfo(np.float16).smallest_normal)
    assert result.target.below_normal == np.count_nonzero((values != 0) & (np.abs(values) < smallest_normal)) == 2
    assert result.target.overflow_before == result.target.below_normal_before == 0 and result.target.values == 9
    assert result.target.largest == np.abs(values).max()
    assert result.target.lossy and result.flags == ["int8", "float16"]


def test_float16_rounding_to_the_largest_value_is_no_overflow():
    # 65519 rounds to 65504 (the largest float16); 65520 rounds to Inf.
    weight = np.array([[65519.0], [65520.0]])
    layout = WeightLayout("matrix_out_in")
    result = measure_fold(weight, weight, layout, named_channels(np.ones(2)), target_dtype="float16")
    assert (result.target.overflow, result.target.overflow_before) == (1, 1) and not result.target.lossy


def test_a_few_values_turning_subnormal_do_not_flag_float16():
    # 200 ordinary weights and one that the fold scales below float16's smallest normal value (6.1e-5): 0.5%.
    weight = np.full((2, 100), 0.5)
    weight[1, 0] = 1e-3
    folded = weight * np.array([[1.0], [0.01]])
    result = measure_fold(weight, folded, WeightLayout("matrix_out_in"), named_channels(np.array([1.0, 0.01])), target_dtype="float16")
    assert (result.target.below_normal, result.target.below_normal_before, result.target.values) == (1, 0, 200)
    assert not result.target.lossy


def test_bfloat16_overflow():
    weight = np.array([[1e38], [1.0]])
    folded = weight * np.array([[10.0], [1.0]])  # 1e39: past bfloat16's 3.39e38
    layout, channels = WeightLayout("matrix_out_in"), named_channels(np.array([10.0, 1.0]))
    result = measure_fold(weight, folded, layout, channels, target_dtype="bfloat16")
    assert (result.target.dtype, result.target.overflow, result.target.overflow_before) == ("bfloat16", 1, 0)
    assert "bfloat16" in result.flags


def test_unknown_target_dtype_is_refused():
    with pytest.raises(ValueError, match="'int8' is not one of float16, bfloat16"):
        check_target_dtype("int8")


def test_statistics_estimate():
    gamma = np.array([1.0, 1.0, 2.0, 0.0, 1.0])
    var = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    affine = batchnorm_affine(gamma, np.array([0, 0, 0, 0, 7e4]), np.zeros(5), var, EPS)
    lost, overflow = statistics_estimate(affine.scale, affine.shift)
    scale = np.abs(gamma / np.sqrt(var + EPS))
    assert lost == pytest.approx(20 * math.log10(scale.max() / np.median(scale)), rel=1e-12)
    assert overflow == 1  # the shift 7e4 of channel 4
    assert statistics_estimate(np.zeros(3), np.zeros(3)) == (0.0, 0)  # γ = 0 everywhere: nothing to stretch
    assert statistics_estimate(np.array([0.0, 0.0, 1.0]), np.zeros(3))[0] == math.inf


def test_text_table_shows_flagged_layers_only_with_a_count():
    weight, bias, gamma, beta, mean, var = conv_layer()
    layout = WeightLayout("conv")
    affine = batchnorm_affine(gamma, beta, mean, var, EPS)
    folded, _ = fold_into_outputs(weight, bias, affine, layout)
    flagged = measure_fold(weight, folded, layout, named_channels(affine.scale, gamma, mean, var, EPS), layer="conv_a")
    plain = measure_fold(weight, weight, layout, named_channels(np.ones(6)), layer="conv_b")
    lines = format_table([plain, flagged, plain])
    assert lines[0].startswith("quantization: 1 of 3 folded layer(s) flagged (per-tensor int8 loses > 12 dB")
    assert len(lines) == 3 and lines[2].startswith("  conv_a | ")
    assert "3: 424 (γ 300, var 0.5, eps 1e-05)" in lines[2]
    assert format_table([plain]) == [lines[0].replace("1 of 3", "0 of 1")]
