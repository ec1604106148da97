"""bnfold.half_precision_error: the expected half-precision error of a folded layer against the unfolded
layer, against a direct numpy simulation (every parameter and every op's output rounded to float16 by numpy,
sums in float64) over inputs drawn from the model's input description, on hand-built layers with the
degenerate channels: variance 0 (+ eps), γ = 0, huge γ, tiny γ."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnfold.fold_math import WeightLayout, batchnorm_affine, fold_into_inputs, fold_into_outputs
from bnfold.half_precision_error import FOLDED_ERROR_FLAG_RATIO, BatchNormParameters, compare_half_precision
from bnfold.quantization import measure_fold, named_channels

EPS = 1e-5
LINEAR = WeightLayout("matrix_out_in")
SAMPLES = 100_000
# The model's op-output rounding is a statistical description (uniform within half an ulp, values log-uniform
# in their binade); parameter roundings are exact. On channels whose outputs spread, the model is within
# 0.92-1.35x of the simulation (folded side within 1.3%); allowed 40%.
MODEL_AGREEMENT = 0.4


def half(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float16).astype(np.float64)


def simulated_errors(exact, unfolded, folded) -> tuple[np.ndarray, np.ndarray]:
    """The RMS over samples of each channel's error (channels on axis 0)."""
    return np.sqrt(np.mean((unfolded - exact) ** 2, axis=1)), np.sqrt(np.mean((folded - exact) ** 2, axis=1))


def per_channel(rows, bias, folded_rows, folded_bias, direction, parameters, channel_count):
    """compare_half_precision's errors for every channel, one channel at a time (its figures are the worst's)."""
    errors = []
    for channel in range(channel_count):
        keep = slice(channel, channel + 1)
        if direction == "into-preceding":
            one = BatchNormParameters(*(a[keep] for a in (parameters.gamma, parameters.beta, parameters.mean, parameters.variance)), parameters.eps)
        else:
            one = parameters
        result = compare_half_precision(rows[keep], bias[keep], folded_rows[keep], folded_bias[keep], LINEAR, direction, one, "float16")
        errors.append((result.unfolded_error, result.folded_error))
    return np.array(errors).T


def test_into_preceding_layer_matches_a_float16_simulation():
    """Linear (6 out, 40 in) -> BatchNorm: ordinary channels 0 and 4, variance 0 (+ eps) in channel 1, γ 0 in
    channel 2, γ 300 in channel 3, γ 1e-4 with β 0 in channel 5 (folded weights below float16's normal range)."""
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(0, 0.2, (6, 40)), rng.normal(0, 0.1, 6)
    gamma = np.array([1.0, 0.8, 0.0, 300.0, 1.2, 1e-4])
    beta = np.array([0.1, -0.2, 0.3, 0.0, 0.05, 0.0])
    input_moment = 0.7  # the layer's inputs: independent, zero-mean, E[x²] 0.7, so y has mean b, variance 0.7 Σw²
    mean, variance = bias.copy(), input_moment * np.square(weight).sum(axis=1)
    variance[1] = 0.0  # channel 1's output is constant (its inputs are 0 below)
    parameters = BatchNormParameters(gamma, beta, mean, variance, EPS)
    affine = batchnorm_affine(gamma, beta, mean, variance, EPS)
    folded_weight, folded_bias = fold_into_outputs(weight, bias, affine, LINEAR)

    inputs = half(rng.normal(0, math.sqrt(input_moment), (40, SAMPLES)))
    inputs_of = np.repeat(inputs[None], 6, axis=0)
    inputs_of[1] = 0.0
    layer = np.einsum("ck,cks->cs", weight, inputs_of) + bias[:, None]
    exact = affine.scale[:, None] * layer + affine.shift[:, None]
    stored = batchnorm_affine(half(gamma), half(beta), half(mean), half(variance), EPS)
    layer_half = half(np.einsum("ck,cks->cs", half(weight), inputs_of) + half(bias)[:, None])
    unfolded = half(stored.scale[:, None] * layer_half + stored.shift[:, None])
    folded = half(np.einsum("ck,cks->cs", half(folded_weight), inputs_of) + half(folded_bias)[:, None])
    simulated_unfolded, simulated_folded = simulated_errors(exact, unfolded, folded)

    model_unfolded, model_folded = per_channel(weight, bias, folded_weight, folded_bias, "into-preceding", parameters, 6)
    spread = [0, 3, 4, 5]  # channels with a spread of outputs; 1 and 2 are constant, checked below
    assert model_unfolded[spread] == pytest.approx(simulated_unfolded[spread], rel=MODEL_AGREEMENT)
    assert model_folded[spread] == pytest.approx(simulated_folded[spread], rel=MODEL_AGREEMENT)
    # γ 0: both sides hold β rounded, exactly the same terms.
    assert model_folded[2] == model_unfolded[2] and not np.any(folded_weight[2])
    # Constant outputs: the error is the rounding of one value, which the model describes only statistically.
    assert simulated_folded[1] <= simulated_unfolded[1] and model_folded[1] <= 1.1 * model_unfolded[1]
    # Channel 5: the fold scales its weights by 1e-4 into float16's subnormal range, and worse by the flag's
    # margin, in the simulation as in the model; the others are no worse folded.
    assert simulated_folded[5] > FOLDED_ERROR_FLAG_RATIO * simulated_unfolded[5]
    result = compare_half_precision(weight, bias, folded_weight, folded_bias, LINEAR, "into-preceding", parameters, "float16")
    assert (result.channel, result.channels_worse, result.worse) == (5, 1, True)
    assert result.ratio == pytest.approx(model_folded[5] / model_unfolded[5], rel=1e-12)
    assert result.ratio > FOLDED_ERROR_FLAG_RATIO
    assert result.output_rms == pytest.approx(np.sqrt(np.mean(exact[5] ** 2)), rel=0.02)
    assert np.all(simulated_folded[[0, 3, 4]] < 1.1 * simulated_unfolded[[0, 3, 4]])


def test_into_following_layer_matches_a_float16_simulation():
    """BatchNorm (8 channels) -> Linear (6 out): channel 0's inputs have mean 100 and spread 1, so the folded
    bias cancels terms of ~100 that the BatchNorm subtracted before rounding; variance 0 in channel 6."""
    rng = np.random.default_rng(5)
    weight, bias = rng.normal(0, 0.3, (6, 8)), rng.normal(0, 0.1, 6)
    mean = np.array([100.0, 0.5, -0.2, 0.0, 0.1, 3.0, 0.0, 1.0])
    spread = np.array([1.0, 1.0, 0.5, 2.0, 1.0, 1.0, 0.0, 1.0])
    gamma, beta = rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.2, 8)
    parameters = BatchNormParameters(gamma, beta, mean, np.square(spread), EPS)
    affine = batchnorm_affine(gamma, beta, mean, np.square(spread), EPS)
    folded_weight, folded_bias = fold_into_inputs(weight, bias, affine, LINEAR)

    inputs = half(mean[:, None] + spread[:, None] * rng.normal(0, 1, (8, SAMPLES)))
    exact = weight @ (affine.scale[:, None] * inputs + affine.shift[:, None]) + bias[:, None]
    stored = batchnorm_affine(half(gamma), half(beta), half(mean), half(np.square(spread)), EPS)
    normalised = half(stored.scale[:, None] * inputs + stored.shift[:, None])
    unfolded = half(half(weight) @ normalised + half(bias)[:, None])
    folded = half(half(folded_weight) @ inputs + half(folded_bias)[:, None])
    simulated_unfolded, simulated_folded = simulated_errors(exact, unfolded, folded)

    model_unfolded, model_folded = per_channel(weight, bias, folded_weight, folded_bias, "into-following", parameters, 6)
    assert model_unfolded == pytest.approx(simulated_unfolded, rel=MODEL_AGREEMENT)
    assert model_folded == pytest.approx(simulated_folded, rel=MODEL_AGREEMENT)
    result = compare_half_precision(weight, bias, folded_weight, folded_bias, LINEAR, "into-following", parameters, "float16")
    worst = int(np.argmax(simulated_folded / simulated_unfolded))
    assert result.channel == worst and result.ratio > 10 and result.channels_worse == np.count_nonzero(
        model_folded > FOLDED_ERROR_FLAG_RATIO * model_unfolded
    )


def test_overflow_either_side():
    weight, bias = np.array([[0.5, -0.25], [0.1, 0.2]]), np.zeros(2)
    mean, variance = np.zeros(2), np.array([0.0, 1.0])
    # γ 1e3 on variance 0: folded weights 1.6e5, past float16's 65504; the unfolded layer keeps its weights.
    gamma = np.array([1e3, 1.0])
    affine = batchnorm_affine(gamma, None, mean, variance, EPS)
    folded_weight, folded_bias = fold_into_outputs(weight, bias, affine, LINEAR)
    parameters = BatchNormParameters(gamma, None, mean, variance, EPS)
    result = compare_half_precision(weight, bias, folded_weight, folded_bias, LINEAR, "into-preceding", parameters, "float16")
    assert (result.channel, result.folded_error, result.ratio, result.worse) == (0, math.inf, math.inf, True)
    # γ 1e5 overflows float16 itself: the unfolded BatchNorm is lost there, the fold cannot be worse.
    parameters = BatchNormParameters(np.array([1e5, 1.0]), None, mean, np.ones(2), EPS)
    affine = batchnorm_affine(parameters.gamma, None, mean, np.ones(2), EPS)
    folded_weight, folded_bias = fold_into_outputs(weight * 1e-3, bias, affine, LINEAR)
    result = compare_half_precision(weight * 1e-3, bias, folded_weight, folded_bias, LINEAR, "into-preceding", parameters, "float16")
    assert result.unfolded_error == math.inf and not result.worse


def test_measure_fold_flags_and_reports_the_error():
    weight, bias = np.array([[0.5, -0.25], [0.1, 0.2]]), np.array([0.1, 0.0])
    gamma, mean, variance = np.array([1.0, 1.0]), np.array([100.0, 0.0]), np.array([1.0, 1.0])
    affine = batchnorm_affine(gamma, None, mean, variance, EPS)
    folded_weight, folded_bias = fold_into_inputs(weight, bias, affine, LINEAR)
    parameters = BatchNormParameters(gamma, None, mean, variance, EPS)
    result = measure_fold(
        weight, folded_weight, LINEAR, named_channels(affine.scale), bias_before=bias, bias_after=folded_bias,
        target_dtype="float16", batchnorm_parameters=parameters, direction="into-following",
    )  # fmt: skip
    assert result.flags == ["float16-error"] and result.target.error.worse
    entry = result.to_dict()["target_dtype"]["error"]
    assert entry["dtype"] == "float16" and entry["worse"] and entry["ratio"] == result.target.error.ratio > 10
    # Without the BatchNorm's parameters (a bare x * scale + shift) there is no unfolded model to compare with.
    bare = measure_fold(weight, folded_weight, LINEAR, named_channels(affine.scale), target_dtype="float16")
    assert bare.target.error is None and bare.to_dict()["target_dtype"]["error"] is None
