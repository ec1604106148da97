"""Does a fold make evaluating the layer in half precision less accurate than evaluating it unfolded?

Both sides are evaluated in the target dtype (float16, bfloat16) as frameworks do: parameters stored in
that dtype, products summed in float32 (exact against a half-precision rounding), every op's output
rounded to the dtype. *Unfolded* is the layer then the BatchNorm, both with their own parameters rounded
(the BatchNorm's scale and shift computed from its rounded γ, β, mean and variance); *folded* is the layer
with its folded parameters rounded. Each is compared with the exact (float64) evaluation of the same map.

No inputs are run: the error is the expectation, per output channel, of the first-order error model over
inputs described by the BatchNorm's running statistics (the only description of the data the model
carries, and what verification's random inputs are not):

- into the preceding layer: the statistics are those of the layer's output ``y``; the layer's inputs are
  taken independent, zero-mean, with the second moment that gives ``E[(y - b)²] = var + (mean - b)²``.
- into the following layer: the statistics are those of the layer's input channels; the inputs are taken
  independent with that mean and variance.

A parameter's rounding error is exact (the rounded value minus the exact one); an op output ``v`` rounded
to the dtype adds an error of variance ``ρ² E[v²] + τ²``: uniform within half an ulp, ``v`` log-uniform
within its binade (``ρ² = 2^(-2·mantissa bits) / (32 ln 2)``), plus the subnormal spacing's ``τ² = step² / 12``.
Errors are independent and add in quadrature. The final output's rounding is common to both sides, so a
fold that changes nothing has a ratio near 1; a channel is *worse* when its folded error exceeds
:data:`FOLDED_ERROR_FLAG_RATIO` times its unfolded error: beyond that the folded parameters' own rounding
is at least twice the rounding of the output itself, e.g. folded weights pushed below the dtype's normal
range (tiny γ/sqrt(var+eps)), or, folding into a following layer, inputs whose mean dwarfs their spread
(the folded bias cancels terms the BatchNorm used to subtract before rounding).
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

from bnfold.fold_math import (
    UnfoldableStatisticsError,
    WeightLayout,
    batchnorm_affine,
    input_channel_rows,
    round_to_dtype,
)

# A channel is worse folded when its folded error is more than this many times its unfolded error (6 dB).
FOLDED_ERROR_FLAG_RATIO = 2.0


@dataclasses.dataclass(frozen=True)
class BatchNormParameters:
    """A BatchNorm's parameters as float64 arrays (``gamma``/``beta`` None for affine=False)."""

    gamma: np.ndarray | None
    beta: np.ndarray | None
    mean: np.ndarray
    variance: np.ndarray
    eps: float


@dataclasses.dataclass(frozen=True)
class HalfPrecisionError:
    """The expected RMS error of one fold's layer evaluated in ``dtype``, folded against unfolded, at the
    channel where folding is worst (largest ratio), in the layer's output units next to that channel's RMS
    output; and how many channels are worse folded (:data:`FOLDED_ERROR_FLAG_RATIO`)."""

    dtype: str
    channel: int
    folded_error: float
    unfolded_error: float
    output_rms: float
    channels_worse: int
    channels: int

    @property
    def ratio(self) -> float:
        return float(_ratio(self.folded_error, self.unfolded_error))

    @property
    def worse(self) -> bool:
        return self.channels_worse > 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "worse": self.worse}


def _ratio(folded, unfolded):
    """folded / unfolded, elementwise: 1 where both are 0 or both infinite, inf where only unfolded is 0."""
    folded, unfolded = np.asarray(folded, dtype=np.float64), np.asarray(unfolded, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(unfolded > 0, folded / unfolded, np.where(folded > 0, math.inf, 1.0))
    return np.where(np.isnan(ratio), 1.0, ratio)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a target dtype's name (bfloat16 from ml_dtypes)."""
    return np.dtype(getattr(ml_dtypes, name) if name == "bfloat16" else name)


def rounding_variance(second_moment: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The variance of the error of rounding values of ``E[v²] = second_moment`` to ``dtype``."""
    info = ml_dtypes.finfo(dtype)
    relative = math.ldexp(1.0, -2 * info.nmant) / (32 * math.log(2))
    return relative * second_moment + float(info.smallest_subnormal) ** 2 / 12


def rounding_error(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The error of storing ``values`` (float32 or float64) in ``dtype``, in their own dtype (inf where they
    overflow): exact, since a value and its rounding to a narrower format differ by a multiple of its ulp."""
    with np.errstate(over="ignore"):
        # One rounding either way: float32 -> dtype directly, float64 through round_to_dtype (bfloat16).
        stored = round_to_dtype(values, dtype) if values.dtype == np.float64 else values.astype(dtype)
        error = stored.astype(values.dtype)
    error -= values
    return error


def compare_half_precision(
    rows: np.ndarray,
    bias: np.ndarray | None,
    folded_rows: np.ndarray,
    folded_bias: np.ndarray | None,
    layout: WeightLayout,
    direction: str,
    parameters: BatchNormParameters,
    dtype: str,
) -> HalfPrecisionError:
    """The figures of one fold: the layer's weight before and after as output-channel rows
    (:func:`bnfold.fold_math.output_channel_rows` of ``layout``), its bias before and after."""
    target = numpy_dtype(dtype)
    exact = batchnorm_affine(parameters.gamma, parameters.beta, parameters.mean, parameters.variance, parameters.eps)
    try:
        stored = batchnorm_affine(*(_stored(array, target) for array in _statistics(parameters)), parameters.eps)
    except UnfoldableStatisticsError:  # a parameter overflows the dtype: the unfolded BatchNorm is lost there
        stored = None
    out_channels = rows.shape[0]
    bias64, folded_bias64 = _vector(bias, out_channels), _vector(folded_bias, out_channels)
    mean, variance = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (parameters.mean, parameters.variance))
    with np.errstate(invalid="ignore"):  # an infinite parameter times an input of 0: NaN, made inf below
        if direction == "into-preceding":
            unfolded, folded, output_moment = _into_preceding(
                rows, bias64, folded_rows, folded_bias64, exact, stored, mean, variance, target
            )
        else:
            unfolded, folded, output_moment = _into_following(
                rows, bias64, folded_rows, folded_bias64, exact, stored, layout, mean, variance, target
            )
    # A parameter that overflows the dtype makes the layer's output Inf or NaN: no finite error.
    unfolded, folded = (np.where(np.isnan(error_variance), math.inf, error_variance) for error_variance in (unfolded, folded))
    output_rounding = rounding_variance(output_moment, target)
    unfolded_error, folded_error = np.sqrt(unfolded + output_rounding), np.sqrt(folded + output_rounding)
    ratio = _ratio(folded_error, unfolded_error)
    worst = int(np.argmax(ratio))
    return HalfPrecisionError(
        dtype=dtype,
        channel=worst,
        folded_error=float(folded_error[worst]),
        unfolded_error=float(unfolded_error[worst]),
        output_rms=float(np.sqrt(output_moment[worst])),
        channels_worse=int(np.count_nonzero(ratio > FOLDED_ERROR_FLAG_RATIO)),
        channels=out_channels,
    )


def _into_preceding(rows, bias, folded_rows, folded_bias, exact, stored, mean, variance, target):
    """Per output channel: the unfolded and folded error variances and the output's second moment."""
    scale, shift = exact.scale, exact.shift
    output_moment = np.square(scale * mean + shift) + np.square(scale) * variance
    layer_moment = np.square(mean) + variance  # E[y²]
    weight_energy = _square_sum(rows)
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero row has no inputs to calibrate
        input_moment = np.where(weight_energy > 0, (variance + np.square(mean - bias)) / weight_energy, 0.0)
    folded = input_moment * _square_sum(rounding_error(folded_rows, target)) + np.square(rounding_error(folded_bias, target))
    layer = input_moment * _square_sum(rounding_error(rows, target)) + np.square(rounding_error(bias, target))
    layer += rounding_variance(layer_moment, target)  # the layer's output, rounded before the BatchNorm reads it
    if stored is None:
        return np.full_like(folded, math.inf), folded, output_moment
    scale_error, shift_error = stored.scale - scale, stored.shift - shift
    batchnorm = np.square(scale_error * mean + shift_error) + np.square(scale_error) * variance
    return np.square(scale) * layer + batchnorm, folded, output_moment


def _into_following(rows, bias, folded_rows, folded_bias, exact, stored, layout, mean, variance, target):
    """Per output channel of the layer, its input channels described by the BatchNorm's statistics."""
    input_mean, input_variance = (input_channel_rows(array, layout, rows.shape) for array in (mean, variance))
    scale = input_channel_rows(exact.scale, layout, rows.shape)
    normalised_mean = input_channel_rows(exact.scale * mean + exact.shift, layout, rows.shape)  # the BatchNorm's output
    normalised_variance = np.square(scale) * input_variance
    output_moment = np.square((rows * normalised_mean).sum(axis=1) + bias) + (np.square(rows) * normalised_variance).sum(axis=1)
    folded = _linear_form_variance(rounding_error(folded_rows, target), rounding_error(folded_bias, target), input_mean, input_variance)
    layer = _linear_form_variance(rounding_error(rows, target), rounding_error(bias, target), normalised_mean, normalised_variance)
    # Each normalised input is rounded to the dtype before the layer reads it.
    layer += (np.square(rows) * rounding_variance(np.square(normalised_mean) + normalised_variance, target)).sum(axis=1)
    if stored is None:
        return np.full_like(folded, math.inf), folded, output_moment
    scale_error = input_channel_rows(stored.scale - exact.scale, layout, rows.shape)
    shift_error = input_channel_rows(stored.shift - exact.shift, layout, rows.shape)
    # The BatchNorm's parameter errors, the same in every position: a shift of the inputs' mean.
    layer += _linear_form_variance(rows, np.zeros_like(bias), scale_error * input_mean + shift_error, np.square(scale_error) * input_variance)
    return layer, folded, output_moment


def _linear_form_variance(coefficients, constant, mean, variance):
    """``E[(Σ c_i x_i + constant)²]`` per row, for independent ``x_i`` of the given mean and variance."""
    return np.square((coefficients * mean).sum(axis=1) + constant) + (np.square(coefficients) * variance).sum(axis=1)


def _square_sum(rows: np.ndarray) -> np.ndarray:
    """Each row's ``Σ v²``, float64 (in one pass, no temporary: the rows can be large)."""
    return np.einsum("ij,ij->i", rows, rows).astype(np.float64)


def _vector(values: np.ndarray | None, size: int) -> np.ndarray:
    """A bias as one value per output channel. A Gemm's C may vary along its rows too ([M, N], [M, 1]): then
    each channel's mean over them stands for its rows."""
    if values is None:
        return np.zeros(size)
    values = np.asarray(values, dtype=np.float64)
    rows = values.reshape(-1, values.shape[-1]) if values.ndim == 2 else values.reshape(1, -1)
    return np.broadcast_to(rows, (rows.shape[0], size)).mean(axis=0)


def _statistics(parameters: BatchNormParameters) -> tuple:
    return parameters.gamma, parameters.beta, parameters.mean, parameters.variance


def _stored(array: np.ndarray | None, target: np.dtype) -> np.ndarray | None:
    """``array`` as the cast model stores it, back in float64 (inf where it overflows)."""
    if array is None:
        return None
    with np.errstate(over="ignore"):
        return np.asarray(round_to_dtype(array, target), dtype=np.float64)

