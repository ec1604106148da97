"""The fold algebra shared by the ONNX and PyTorch front-ends.

An eval-mode BatchNorm is the per-channel affine map ``y = s * x + t`` with

    s = gamma / sqrt(var + eps)        t = beta - mean * s

(:func:`batchnorm_affine`). A layer ``y = W x + b`` followed by that map becomes ``(s W) x + (s b + t)``
(:func:`fold_into_outputs`, the *backward* fold); the map followed by the layer becomes
``(W s) x + (W t + b)`` (:func:`fold_into_inputs`, the *forward* fold, only exact when the layer never
sees padding values, which would not be shifted).

Everything is computed in float64 and rounded once, at the end, to the weight's dtype (or to
``out_dtype``) by :func:`round_to_dtype`. A fold whose weight or bias would round to NaN or Inf there is
refused (:class:`FoldOverflowError`). Arrays are numpy; the PyTorch front-end converts at its boundary.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import ml_dtypes
import numpy as np

LayoutKind = Literal["conv", "conv_transpose", "matrix_in_out", "matrix_out_in"]


class UnfoldableStatisticsError(ValueError):
    """BatchNorm parameters that no finite scale and shift can represent."""


class FoldOverflowError(ValueError):
    """A folded weight or bias with a value its dtype cannot hold: NaN, Inf, or past the dtype's range."""

    def __init__(self, what: str, dtype: np.dtype, largest: float):
        self.what, self.dtype, self.largest = what, np.dtype(dtype), largest
        if math.isfinite(largest):
            limit = float(ml_dtypes.finfo(self.dtype).max)
            problem = f"reaches {largest:.4g}, past the largest {self.dtype.name} value ({limit:g})"
        else:
            problem = f"has NaN or Inf values ({self.dtype.name})"
        super().__init__(f"the folded {what} {problem}")


@dataclasses.dataclass(frozen=True)
class ChannelAffine:
    """A per-channel map ``y = scale * x + shift``, float64, one entry per channel. ``shift_terms`` is the
    size of the terms the shift is a sum of (a BatchNorm's |beta| + |mean * scale|; |shift| when not given):
    a fold computed in a narrower float rounds the shift in proportion to them, not to its value."""

    scale: np.ndarray
    shift: np.ndarray
    shift_terms: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return self.scale.shape[0]

    @property
    def shift_magnitude(self) -> np.ndarray:
        return np.abs(self.shift) if self.shift_terms is None else self.shift_terms

    def then(self, other: ChannelAffine) -> ChannelAffine:
        """This map followed by ``other``: ``other.scale * (scale * x + shift) + other.shift``."""
        terms = np.abs(other.scale) * self.shift_magnitude + other.shift_magnitude
        return ChannelAffine(other.scale * self.scale, other.scale * self.shift + other.shift, terms)


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """Where a layer's weight keeps its output and input channels.

    - ``conv``: ``(C_out, C_in / groups, *kernel)`` (Conv, torch ConvNd).
    - ``conv_transpose``: ``(C_in, C_out / groups, *kernel)`` (ConvTranspose, torch ConvTransposeNd).
    - ``matrix_in_out``: ``(K, N)``, ``y = x @ W`` (MatMul, Gemm with transB=0).
    - ``matrix_out_in``: ``(N, K)``, ``y = x @ W.T`` (torch Linear, Gemm with transB=1).
    """

    kind: LayoutKind
    groups: int = 1

    def grouped_view(self, weight: np.ndarray) -> tuple[np.ndarray, int, int]:
        """``weight`` as ``(groups, out_per_group, in_per_group, rest...)`` plus the two per-group sizes.

        Reshapes and transposes are views, so callers can write through them into a copy.
        """
        g = self.groups
        if self.kind == "conv":
            out_total, in_per_group = weight.shape[0], weight.shape[1]
            view = weight.reshape(g, out_total // g, in_per_group, -1)
        elif self.kind == "conv_transpose":
            in_total, out_per_group = weight.shape[0], weight.shape[1]
            view = weight.reshape(g, in_total // g, out_per_group, -1).transpose(0, 2, 1, 3)
        elif self.kind == "matrix_in_out":
            view = weight.T.reshape(1, weight.shape[1], weight.shape[0], 1)
        else:  # matrix_out_in
            view = weight.reshape(1, weight.shape[0], weight.shape[1], 1)
        return view, view.shape[1], view.shape[2]

    def out_channels(self, weight_shape: tuple[int, ...]) -> int:
        if self.kind == "conv":
            return weight_shape[0]
        if self.kind == "conv_transpose":
            return weight_shape[1] * self.groups
        if self.kind == "matrix_in_out":
            return weight_shape[1]
        return weight_shape[0]

    def out_channel_axis(self) -> int | None:
        """The weight axis that holds the output channels alone; None for a grouped transposed convolution,
        whose axis 1 holds one group's."""
        if self.kind == "conv_transpose":
            return 1 if self.groups == 1 else None
        return 1 if self.kind == "matrix_in_out" else 0

    def in_channels(self, weight_shape: tuple[int, ...]) -> int:
        if self.kind == "conv":
            return weight_shape[1] * self.groups
        if self.kind == "conv_transpose":
            return weight_shape[0]
        if self.kind == "matrix_in_out":
            return weight_shape[0]
        return weight_shape[1]


def output_channel_rows(weight: np.ndarray, layout: WeightLayout, dtype: np.dtype | type = np.float64) -> np.ndarray:
    """``weight`` as ``(output channels, weights per channel)`` in ``dtype``."""
    view, _, _ = layout.grouped_view(np.asarray(weight, dtype=dtype))
    return view.reshape(view.shape[0] * view.shape[1], -1)


def input_channel_rows(per_input_channel: np.ndarray, layout: WeightLayout, rows_shape: tuple[int, int]) -> np.ndarray:
    """A per-input-channel array laid out like :func:`output_channel_rows` of a weight whose rows have
    ``rows_shape``: each weight gets the value of the input channel it reads."""
    groups = layout.groups
    in_per_group = per_input_channel.size // groups
    by_group = np.asarray(per_input_channel, dtype=np.float64).reshape(groups, 1, in_per_group, 1)
    shape = (groups, rows_shape[0] // groups, in_per_group, rows_shape[1] // in_per_group)
    return np.broadcast_to(by_group, shape).reshape(rows_shape)


def round_to_dtype(array: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Round float64 ``array`` to ``dtype`` once, to nearest even (an array of that dtype already is returned as is).

    numpy rounds float64 to float32 and float16 directly. bfloat16 (ml_dtypes, and torch alike) goes
    through float32, which rounds twice; going through float32 rounded *to odd* instead keeps the
    single correct rounding (float32 has more than two extra bits over bfloat16's 8).
    """
    dtype = np.dtype(dtype)
    if isinstance(array, np.ndarray) and array.dtype == dtype:
        return array  # rounded already
    array = np.asarray(array, dtype=np.float64)
    if dtype.kind == "f" or dtype.name != "bfloat16":  # (dtype.name is slow: ask only for exotic kinds)
        return array.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        narrow = array.astype(np.float32)
        widened = narrow.astype(np.float64)
        # Truncate toward zero, then set the last bit wherever the truncation dropped something.
        overshoot = np.abs(widened) > np.abs(array)
        narrow[overshoot] = np.nextafter(narrow[overshoot], np.float32(0))
        inexact = np.isfinite(array) & (narrow.astype(np.float64) != array)
    narrow.view(np.uint32)[inexact] |= np.uint32(1)
    return narrow.astype(dtype)


@functools.cache
def overflow_threshold(dtype: np.dtype) -> float:
    """The magnitude from which float64 values round to Inf in ``dtype``: its largest finite value plus half
    an ulp there (a tie rounds to even, which is Inf). Inf for float64."""
    largest = float(ml_dtypes.finfo(dtype).max)
    half_ulp = math.ldexp(1.0, math.frexp(largest)[1] - 2 - ml_dtypes.finfo(dtype).nmant)
    return largest + half_ulp


def check_fits(array: np.ndarray, dtype: np.dtype | type, what: str) -> None:
    """Raise :class:`FoldOverflowError` unless every value of float64 ``array`` rounds to a finite ``dtype``
    value (NaN fails the comparison too)."""
    dtype = np.dtype(dtype)
    if not array.size:
        return
    _require_fits(max(float(array.max()), -float(array.min())), dtype, what)  # (no temporary |array|: weights can be large)


def _require_fits(largest: float, dtype: np.dtype, what: str) -> None:
    """Raise :class:`FoldOverflowError` unless values up to ``largest`` in magnitude round to finite
    ``dtype`` values (NaN fails the comparison too)."""
    if not largest < overflow_threshold(dtype):
        raise FoldOverflowError(what, dtype, largest)


def rounded_to_fit(array: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """float64 ``array`` rounded once to ``dtype``; FoldOverflowError (naming it ``what``) where it does not fit."""
    check_fits(array, dtype, what)
    return round_to_dtype(array, dtype)


def batchnorm_affine(
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float | np.ndarray,
) -> ChannelAffine:
    """The eval-mode BatchNorm as ``scale``/``shift`` in float64.

    ``gamma``/``beta`` may be ``None`` (``affine=False``: 1 and 0). Every operation is per channel, so
    the parameters of several BatchNorms can go through one call, concatenated, with ``eps`` an array
    giving each channel its BatchNorm's epsilon. Raises
    :class:`UnfoldableStatisticsError` with the reason when the statistics cannot be folded.
    """
    mean64 = np.asarray(mean, dtype=np.float64).reshape(-1)
    var64 = np.asarray(var, dtype=np.float64).reshape(-1)
    gamma64 = np.ones_like(mean64) if gamma is None else np.asarray(gamma, dtype=np.float64).reshape(-1)
    beta64 = np.zeros_like(mean64) if beta is None else np.asarray(beta, dtype=np.float64).reshape(-1)
    denominator = var64 + np.asarray(eps, dtype=np.float64)
    with np.errstate(all="ignore"):  # bad statistics are diagnosed below, not warned about
        scale = gamma64 / np.sqrt(denominator)
        shift = beta64 - mean64 * scale
    # NaN or Inf anywhere but in the variance shows in scale or shift; an infinite variance gives scale 0.
    if not (np.isfinite(scale).all() and np.isfinite(shift).all() and np.isfinite(var64).all() and (var64 >= 0).all()):
        _raise_unfoldable(gamma64, beta64, mean64, var64, denominator)
    return ChannelAffine(scale, shift, np.abs(beta64) + np.abs(mean64 * scale))


def _raise_unfoldable(gamma64, beta64, mean64, var64, denominator) -> None:
    """Say what is wrong with statistics that gave no finite scale and shift, naming the first channel."""
    for name, array in (("scale", gamma64), ("bias", beta64), ("running mean", mean64), ("running variance", var64)):
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            raise UnfoldableStatisticsError(f"{name} is NaN or Inf in {bad.size} channel(s), first channel {bad[0]}")
    negative = np.flatnonzero(var64 < 0)
    if negative.size:
        raise UnfoldableStatisticsError(
            f"running variance is negative in {negative.size} channel(s), first channel {negative[0]} ({var64[negative[0]]:g})"
        )
    nonpositive = np.flatnonzero(denominator <= 0)
    if nonpositive.size:
        raise UnfoldableStatisticsError(
            f"variance + eps is not positive in {nonpositive.size} channel(s), first channel {nonpositive[0]}"
        )
    raise UnfoldableStatisticsError("scale or shift overflows float64")


def _check_channels(affine: ChannelAffine, expected: int, what: str) -> None:
    if affine.channels != expected:
        raise ValueError(f"the per-channel map has {affine.channels} channels but the layer has {expected} {what}")


def fold_into_outputs(
    weight: np.ndarray,
    bias: np.ndarray | None,
    affine: ChannelAffine,
    layout: WeightLayout,
    out_dtype: np.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Backward fold: the layer ``W, b`` followed by ``affine`` on its output channels.

    Returns the new weight and bias (a bias is created when ``bias`` is None), rounded once to
    ``out_dtype`` (default: the weight's dtype).
    """
    out_dtype = np.dtype(out_dtype or weight.dtype)
    if layout.kind in ("conv", "matrix_out_in") and weight.ndim:
        new_weight = _scaled_rows_rounded(weight, affine, layout, out_dtype)
    else:
        new_weight = rounded_to_fit(_scaled_output_channels(weight, affine, layout), out_dtype, "weight")
    return new_weight, _folded_output_bias(bias, affine, out_dtype)


# Elements of float64 work per numpy call where a large array is gone through a block at a time (a weight
# folded a block of output channels at a time; the verification's comparisons): the block stays in a core's
# cache, where the whole array in float64 would go through memory at each step (twice as fast on ResNet-50's
# largest layers).
BLOCK_ELEMENTS = 1 << 15


def rows_per_block(row_size: int) -> int:
    """How many rows of ``row_size`` elements make a block of about :data:`BLOCK_ELEMENTS` (one at least)."""
    return max(1, BLOCK_ELEMENTS // max(1, row_size))


def _scaled_rows_rounded(weight: np.ndarray, affine: ChannelAffine, layout: WeightLayout, dtype: np.dtype) -> np.ndarray:
    """:func:`_scaled_output_channels` rounded once to ``dtype`` (as :func:`rounded_to_fit`), for a weight whose
    output channels lead, a block of channels at a time."""
    _check_channels(affine, layout.out_channels(weight.shape), "output channels")
    rows = weight.reshape(weight.shape[0], -1)
    result = np.empty(weight.shape, dtype)
    result_rows = result.reshape(rows.shape)
    per_block = rows_per_block(rows.shape[1])
    buffer = np.empty((min(per_block, rows.shape[0]), rows.shape[1]))
    # numpy rounds float64 to float32 and float16 once, to nearest even, as it casts into the result.
    direct = dtype.kind == "f" and dtype.name != "bfloat16"
    with np.errstate(over="ignore", invalid="ignore"):  # (a value that does not fit is refused below)
        for start in range(0, rows.shape[0], per_block):
            block = slice(start, start + per_block)
            scaled = buffer[: len(rows[block])]
            np.copyto(scaled, rows[block])  # (then a float64 multiply: 10% faster than numpy's mixed-type loop)
            np.multiply(scaled, affine.scale[block, None], out=scaled)
            if direct:
                np.copyto(result_rows[block], scaled, casting="unsafe")
            else:
                result_rows[block] = round_to_dtype(scaled, dtype)
            # Rounding gives Inf or NaN exactly where a value does not fit (or is NaN already): the error
            # then names the largest magnitude of the whole weight.
            if not np.isfinite(result_rows[block]).all():
                check_fits(rows * affine.scale[:, None], dtype, "weight")
    return result


def _scaled_output_channels(weight: np.ndarray, affine: ChannelAffine, layout: WeightLayout) -> np.ndarray:
    """``weight`` in float64 with each output channel times its ``affine.scale``."""
    _check_channels(affine, layout.out_channels(weight.shape), "output channels")
    with np.errstate(invalid="ignore"):  # (a signalling NaN in the weight raises the flag; NaN is refused later)
        new_weight = np.array(weight, dtype=np.float64)
    view, out_per_group, _ = layout.grouped_view(new_weight)
    view *= affine.scale.reshape(layout.groups, out_per_group, 1, 1)
    return new_weight


def _folded_output_bias(bias: np.ndarray | None, affine: ChannelAffine, dtype: np.dtype) -> np.ndarray:
    """``scale * b + shift`` over the bias's last axis (a Gemm's C may be ``[M, N]``), rounded once to ``dtype``."""
    return rounded_to_fit(_output_bias64(bias, affine), dtype, "bias")


def _output_bias64(bias: np.ndarray | None, affine: ChannelAffine) -> np.ndarray:
    return affine.scale * _bias64(bias, affine.channels) + affine.shift


def _bias64(bias: np.ndarray | None, out_total: int) -> np.ndarray:
    return np.zeros(out_total) if bias is None else np.asarray(bias, dtype=np.float64)


class InexactQuantizedFoldError(ValueError):
    """A fold into a quantized weight that its integers, zero points and scales cannot express exactly."""


@dataclasses.dataclass(frozen=True)
class QuantizedOutputFold:
    """A fold into ``DequantizeLinear(quantized, scale, zero_point)``: per-channel scale (and zero point, when
    the weight had one), the integer weight (None when unchanged), and the layer's new float bias."""

    scale: np.ndarray
    zero_point: np.ndarray | None
    quantized: np.ndarray | None
    bias: np.ndarray
    mirrored: int  # channels whose integers were mirrored (negative BatchNorm scale)


def fold_into_quantized_outputs(
    quantized: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    axis: int,
    bias: np.ndarray | None,
    affine: ChannelAffine,
) -> QuantizedOutputFold:
    """Backward fold into a weight stored as integers: ``W = (quantized - zero_point) * scale``, per channel
    along ``axis`` (a one-value ``scale``/``zero_point`` is per-tensor and becomes per-channel).

    Channel ``c`` of ``affine.scale * W`` is ``(q - z) * (scale * s)``: the scale absorbs ``s``, rounded once to
    its dtype, and the integers stay. The scale stays positive (runtimes require it): where ``s < 0`` the
    integers are mirrored about the zero point, ``q' = 2 z - q``, which is exact while ``q'`` is in the
    integer type's range. Raises :class:`InexactQuantizedFoldError`, naming the channel, where it is not, where
    ``s = 0``, or where the new scale underflows to 0. The bias is ``scale * b + shift`` in the scale's dtype.
    """
    channels = quantized.shape[axis]
    _check_channels(affine, channels, "output channels")
    per_channel = (channels,)
    factor = affine.scale
    dead = np.flatnonzero(factor == 0)
    if dead.size:
        raise InexactQuantizedFoldError(
            f"the BatchNorm's scale is 0 in {dead.size} channel(s), first channel {dead[0]}: the quantization scale would be 0"
        )
    scale64 = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), per_channel)
    new_scale = rounded_to_fit(scale64 * np.abs(factor), scale.dtype, "quantization scale")
    underflow = np.flatnonzero(new_scale == 0)
    if underflow.size:
        raise InexactQuantizedFoldError(
            f"the quantization scale of channel {underflow[0]} rounds to 0 in {np.dtype(scale.dtype).name} "
            f"(BatchNorm scale {factor[underflow[0]]:.3g})"
        )
    zero = None if zero_point is None else np.broadcast_to(zero_point.reshape(-1), per_channel).copy()
    negative = factor < 0
    mirrored = _mirrored(quantized, zero, axis, negative)
    return QuantizedOutputFold(new_scale, zero, mirrored, _folded_output_bias(bias, affine, scale.dtype), int(negative.sum()))


def _mirrored(quantized: np.ndarray, zero_point: np.ndarray | None, axis: int, negative: np.ndarray) -> np.ndarray | None:
    """``quantized`` with the channels where ``negative`` mirrored about their zero point (``2 z - q``), or
    None when no channel is; raises where a mirrored value leaves the integer type."""
    if not negative.any():
        return None
    moved = np.moveaxis(quantized, axis, 0).astype(np.int64)
    zero = np.zeros(len(negative), np.int64) if zero_point is None else zero_point.astype(np.int64)
    centre = (2 * zero).reshape((-1,) + (1,) * (moved.ndim - 1))
    mirrored = np.where(negative.reshape(centre.shape), centre - moved, moved)
    limits = ml_dtypes.iinfo(quantized.dtype)
    outside = (mirrored < limits.min) | (mirrored > limits.max)
    channels = np.flatnonzero(outside.reshape(len(negative), -1).any(axis=1))
    if channels.size:
        channel = channels[0]
        value = moved[channel][outside[channel]].reshape(-1)[0]
        raise InexactQuantizedFoldError(
            f"the BatchNorm's scale is negative in channel {channel}; a positive quantization scale needs its integers "
            f"mirrored about the zero point ({zero[channel]}), and 2 x {zero[channel]} - ({value}) is outside "
            f"{np.dtype(quantized.dtype).name}'s range [{limits.min}, {limits.max}] ({channels.size} channel(s) alike)"
        )
    return np.moveaxis(mirrored.astype(quantized.dtype), 0, axis)


# Past this many weight elements a layer's arithmetic outweighs numpy's per-call overhead.
BATCHED_WEIGHT_SIZE = 1 << 14


def fold_many_into_outputs(
    layers: Sequence[tuple[np.ndarray, np.ndarray | None, ChannelAffine, WeightLayout]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`fold_into_outputs` of each ``(weight, bias, affine, layout)``, with the same results bit for
    bit (every element is the same one product, or product and sum, rounded once).

    Small layers (up to :data:`BATCHED_WEIGHT_SIZE` elements) whose weight leads with the output channels
    (``conv``, ``matrix_out_in``) and whose bias is per-channel or absent are computed together, one numpy
    pass per weight dtype: for them numpy's per-call overhead, not the arithmetic, is the cost. Others go
    one by one.
    """
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(layers)
    batches: dict[np.dtype, list[int]] = collections.defaultdict(list)
    for position, (weight, bias, affine, layout) in enumerate(layers):
        channels = weight.shape[0] if weight.ndim else -1
        if (
            weight.size <= BATCHED_WEIGHT_SIZE
            and layout.kind in ("conv", "matrix_out_in")
            and affine.channels == channels
            and (bias is None or bias.shape == (channels,))
        ):
            batches[weight.dtype].append(position)
        else:
            results[position] = fold_into_outputs(weight, bias, affine, layout)
    for dtype, positions in batches.items():
        weights = [layers[p][0] for p in positions]
        channels = [weight.shape[0] for weight in weights]
        per_channel = [weight.size // weight.shape[0] for weight in weights]
        scale = np.concatenate([layers[p][2].scale for p in positions])
        shift = np.concatenate([layers[p][2].shift for p in positions])
        bias = np.concatenate([np.zeros(c) if layers[p][1] is None else layers[p][1] for p, c in zip(positions, channels)])
        new_weight = np.concatenate([weight.reshape(-1) for weight in weights]).astype(np.float64)
        new_weight *= np.repeat(scale, np.repeat(per_channel, channels))
        new_bias = scale * bias.astype(np.float64) + shift
        rounded_weight, rounded_bias = rounded_to_fit(new_weight, dtype, "weight"), rounded_to_fit(new_bias, dtype, "bias")
        weight_end, bias_end = itertools.accumulate(w.size for w in weights), itertools.accumulate(channels)
        for p, weight, w_end, c, b_end in zip(positions, weights, weight_end, channels, bias_end):
            results[p] = rounded_weight[w_end - weight.size : w_end].reshape(weight.shape), rounded_bias[b_end - c : b_end]
    return results


def fold_into_inputs(
    weight: np.ndarray,
    bias: np.ndarray | None,
    affine: ChannelAffine,
    layout: WeightLayout,
    out_dtype: np.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Forward fold: ``affine`` on the layer's input channels, followed by the layer ``W, b``.

    The new bias is ``b + W t`` with the kernel summed over its whole extent, which is exact only
    when every kernel tap reads a real (shifted) input: no padding. The caller checks that.
    """
    out_dtype = np.dtype(out_dtype or weight.dtype)
    new_weight, new_bias = _fold_into_inputs64(weight, bias, affine, layout)
    return rounded_to_fit(new_weight, out_dtype, "weight"), rounded_to_fit(new_bias, out_dtype, "bias")


def _fold_into_inputs64(weight, bias, affine: ChannelAffine, layout: WeightLayout) -> tuple[np.ndarray, np.ndarray]:
    _check_channels(affine, layout.in_channels(weight.shape), "input channels")
    new_weight = np.array(weight, dtype=np.float64)
    view, _, in_per_group = layout.grouped_view(new_weight)
    # W t, per output channel, before scaling the weight in place.
    bias_delta = _sum_over_inputs(view, affine.shift, layout.groups, in_per_group)
    view *= affine.scale.reshape(layout.groups, 1, in_per_group, 1)
    return new_weight, _bias64(bias, layout.out_channels(weight.shape)) + bias_delta


def _sum_over_inputs(view: np.ndarray, per_input: np.ndarray, groups: int, in_per_group: int) -> np.ndarray:
    """``W v`` per output channel of a grouped weight view, for ``v`` one value per input channel."""
    return (view * per_input.reshape(groups, 1, in_per_group, 1)).sum(axis=(2, 3)).reshape(-1)


@dataclasses.dataclass(frozen=True)
class ScaledRows:
    """A weight whose output channels lead (``conv``, ``matrix_out_in``) with each channel times its scale
    (then divided by ``divisor``), in float64, computed a block of channels at a time when read: the exact
    fold of a large weight without a float64 copy of all of it (ResNet-50's parameter check: 0.09 s of its
    0.25 s went into those copies)."""

    weight: np.ndarray
    scale: np.ndarray
    divisor: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    def row_blocks(self):
        """``(first flat index, the float64 values)`` of each block of whole rows, in order."""
        rows = self.weight.reshape(self.weight.shape[0], -1)
        per_block = rows_per_block(rows.shape[1])
        for start in range(0, rows.shape[0], per_block):
            yield start * rows.shape[1], self._values(rows[start : start + per_block], self.scale[start : start + per_block])

    def element(self, index: int) -> float:
        row, column = divmod(index, max(1, self.weight.size // max(1, self.weight.shape[0])))
        return float(self._values(self.weight.reshape(self.weight.shape[0], -1)[row : row + 1, column : column + 1], self.scale[row : row + 1])[0])

    def divided(self, divisor: float) -> ScaledRows:
        return ScaledRows(self.weight, self.scale, self.divisor * divisor)

    def _values(self, rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
        values = np.multiply(rows, scale[:, None], dtype=np.float64)
        if self.divisor != 1.0:
            with np.errstate(divide="ignore", invalid="ignore"):  # a zero alpha: infinitely far, as it is
                values /= self.divisor
        return values.reshape(-1)


@dataclasses.dataclass(frozen=True)
class ExactFold:
    """A fold's weight and bias in float64, before any rounding, and for each bias element the size of the
    terms summed into it (|s b| + |s mean| + |beta| for a backward BatchNorm fold): a fold computed in the
    model's own dtype rounds the bias in proportion to these terms, however much they cancel."""

    weight: np.ndarray | ScaledRows
    bias: np.ndarray
    bias_terms: np.ndarray

    def divided(self, weight_by: float, bias_by: float) -> ExactFold:
        """This fold in the terms of a layer that multiplies its weight by ``weight_by`` and its bias by
        ``bias_by`` (a Gemm's alpha and beta); dividing by zero gives infinities: infinitely far, as it is."""
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = self.weight.divided(weight_by) if isinstance(self.weight, ScaledRows) else self.weight / weight_by
            return ExactFold(weight, self.bias / bias_by, self.bias_terms / abs(bias_by))


def exact_fold(
    weight: np.ndarray, bias: np.ndarray | None, affine: ChannelAffine, layout: WeightLayout, into_outputs: bool
) -> ExactFold:
    """The fold of ``affine`` into the layer's outputs (``into_outputs``) or inputs, unrounded: what a
    candidate fold's parameters are compared with."""
    if into_outputs:
        terms = np.abs(affine.scale * _bias64(bias, affine.channels)) + affine.shift_magnitude
        if layout.kind in ("conv", "matrix_out_in") and weight.ndim:
            _check_channels(affine, layout.out_channels(weight.shape), "output channels")
            new_weight = ScaledRows(weight, affine.scale)
        else:
            new_weight = _scaled_output_channels(weight, affine, layout)
        return ExactFold(new_weight, _output_bias64(bias, affine), terms)
    new_weight, new_bias = _fold_into_inputs64(weight, bias, affine, layout)
    view, _, in_per_group = layout.grouped_view(np.abs(np.asarray(weight, dtype=np.float64)))
    shifted = _sum_over_inputs(view, affine.shift_magnitude, layout.groups, in_per_group)
    return ExactFold(new_weight, new_bias, np.abs(_bias64(bias, layout.out_channels(weight.shape))) + shifted)
