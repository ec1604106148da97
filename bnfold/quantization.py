"""What a fold does to the next steps of deployment: int8 quantization and a cast to half precision.

Folding multiplies each output channel's weights by ``s = γ / sqrt(var + eps)`` (:mod:`bnfold.fold_math`).
One channel with a near-dead variance (``var ≈ 0``, so ``|s| ≈ |γ| / sqrt(eps)``) stretches the layer's
weight range by orders of magnitude: a per-tensor int8 scale is then set by that channel and every other
channel keeps a few levels, or none. :func:`measure_fold` measures it on one folded layer; pure numpy.

The figures, all of them on the weight (the bias is kept in wider precision by int8 toolchains):

- ranges: the per-tensor ``(min, max)`` before and after the fold, and the spread of the per-channel ranges,
  ``max / median`` of each output channel's largest ``|w|`` (``inf`` when more than half the channels are 0).
- int8 SQNR (signal-to-quantization-noise ratio, dB) of symmetric int8 as common toolchains quantize:
  ``step = max|w| / 127``, ``q = round(w / step) * step`` (within -127..127 by the step's choice), with one step for the tensor
  (*per-tensor*) or one per output channel (*per-channel*). Each output channel's SQNR is
  ``10 log10(Σ w² / Σ (w - q)²)`` over its own weights, and a layer's is the **median over its channels**
  (channels whose weights are all 0 are exact and left out; ``inf`` when no noise is left): a whole-tensor
  ratio would be dominated by the stretched channel itself, which quantizes well, and hide the channels that
  lost their resolution, which is what the downstream layers see.
- ``int8_db_lost``: the per-tensor SQNR of the weights before the fold (at most :data:`INT8_UNIFORM_DB`) minus that
  of the folded weights. Past :data:`INT8_LOSS_FLAG_DB` the layer is flagged, with the BatchNorm channels of largest ``|s|`` (the
  ones stretching the range) and their statistics.
- for a target dtype (float16, bfloat16), the folded weight and bias values that round to Inf there
  (overflow) and the non-zero ones below its smallest normal value (flushed or subnormal), against the same
  count on the layer's values before the fold. More overflow than before, or more than
  :data:`BELOW_NORMAL_FLAG_SHARE` of the values newly below the normal range, flags the layer.
- for a target dtype and a BatchNorm with statistics, the expected error of evaluating the folded layer in
  that dtype against evaluating the layer and the BatchNorm unfolded in it (:mod:`bnfold.half_precision_error`);
  a fold worse by more than :data:`~bnfold.half_precision_error.FOLDED_ERROR_FLAG_RATIO` in any output channel
  is flagged ``<dtype>-error``.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

from bnfold.fold_math import WeightLayout, output_channel_rows, overflow_threshold
from bnfold.half_precision_error import (
    FOLDED_ERROR_FLAG_RATIO,
    BatchNormParameters,
    HalfPrecisionError,
    compare_half_precision,
    numpy_dtype,
)

# Flag a layer when per-tensor int8 of its folded weights has a median channel SQNR this many dB below the
# unfolded weights': 12 dB is two bits, a quarter of the resolution. (Ordinary statistics spread the channel
# scales about 2x, which costs ~6 dB; a near-dead channel costs 30-40 dB.)
INT8_LOSS_FLAG_DB = 12.0

# Flag a target dtype when the fold puts more than this share of the layer's values below its normal range
# (beyond those already there): a few tiny weights turning subnormal are common and harmless.
BELOW_NORMAL_FLAG_SHARE = 0.01

# Symmetric int8 uses -127..127 (-128 is left out so that the range is symmetric, as toolchains do).
INT8_LEVELS = 127
# What per-tensor int8 gives a full-scale uniform signal, 20 log10(254) = 48.1 dB. Weights that do better are
# special (integer or ternary weights int8 holds exactly: inf dB); a fold is measured against this, not against
# them, or folded weights at 55 dB would count as an infinite loss.
INT8_UNIFORM_DB = 20 * math.log10(2 * INT8_LEVELS)

# How many of the channels with the largest |scale| a measurement names.
NAMED_CHANNELS = 3

TARGET_DTYPES = ("float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ChannelStatistics:
    """One BatchNorm channel: its index, folded scale ``γ / sqrt(var + eps)`` and, when the BatchNorm has
    them (not a bare ``x * scale + shift``), its γ, running mean and variance and eps."""

    channel: int
    scale: float
    gamma: float | None = None
    mean: float | None = None
    variance: float | None = None
    eps: float | None = None


@dataclasses.dataclass(frozen=True)
class HalfPrecision:
    """The fold's values in a target dtype: how many overflow, how many non-zero ones fall below its
    normal range, before (the layer's own weight and bias) and after the fold."""

    dtype: str
    overflow: int
    overflow_before: int
    below_normal: int
    below_normal_before: int
    values: int  # the folded weight and bias values counted
    largest: float  # the folded values' largest magnitude
    error: HalfPrecisionError | None = None  # evaluated in the dtype, folded against unfolded

    def to_dict(self) -> dict:
        figures = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**figures, "error": None if self.error is None else self.error.to_dict(), "lossy": self.lossy}

    @property
    def lossy(self) -> bool:
        added_below = self.below_normal - self.below_normal_before
        return self.overflow > self.overflow_before or added_below > BELOW_NORMAL_FLAG_SHARE * self.values


@dataclasses.dataclass(frozen=True)
class LayerQuantization:
    """The figures of one fold (see the module docstring); ``direction`` as in :class:`bnfold.report.Fold`."""

    batchnorm: str
    layer: str
    direction: str
    graph: str
    range_before: tuple[float, float]
    range_after: tuple[float, float]
    channel_spread_before: float
    channel_spread_after: float
    int8_per_tensor_db_before: float
    int8_per_tensor_db: float
    int8_per_channel_db: float
    channels: tuple[ChannelStatistics, ...]
    target: HalfPrecision | None = None

    @property
    def int8_db_lost(self) -> float:
        before, after = self.int8_per_tensor_db_before, self.int8_per_tensor_db
        return 0.0 if before == after else min(before, INT8_UNIFORM_DB) - after  # (inf - inf is no loss, not NaN)

    @property
    def flags(self) -> list[str]:
        flags = []
        if self.int8_db_lost > INT8_LOSS_FLAG_DB:
            flags.append("int8")
        if self.target is not None and self.target.lossy:
            flags.append(self.target.dtype)
        if self.target is not None and self.target.error is not None and self.target.error.worse:
            flags.append(f"{self.target.dtype}-error")
        return flags

    def to_dict(self) -> dict:
        return {
            "batchnorm": self.batchnorm,
            "layer": self.layer,
            "direction": self.direction,
            "graph": self.graph,
            "weight_range_before": list(self.range_before),
            "weight_range_after": list(self.range_after),
            "channel_spread_before": self.channel_spread_before,
            "channel_spread_after": self.channel_spread_after,
            "int8_per_tensor_sqnr_db_before": self.int8_per_tensor_db_before,
            "int8_per_tensor_sqnr_db": self.int8_per_tensor_db,
            "int8_per_channel_sqnr_db": self.int8_per_channel_db,
            "int8_per_tensor_db_lost": self.int8_db_lost,
            "flags": self.flags,
            "channels": [dataclasses.asdict(channel) for channel in self.channels],
            "target_dtype": None if self.target is None else self.target.to_dict(),
        }


def check_target_dtype(target_dtype: str | None) -> None:
    if target_dtype is not None and target_dtype not in TARGET_DTYPES:
        raise ValueError(f"target dtype {target_dtype!r} is not one of {', '.join(TARGET_DTYPES)}")


@dataclasses.dataclass(frozen=True)
class RowFigures:
    """What one pass over a weight's output-channel rows gives: the tensor's range, each row's largest
    ``|w|`` and each row's signal ``Σ w²``."""

    range: tuple[float, float]
    largest: np.ndarray
    signal: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray) -> RowFigures:
        if not rows.size:
            return cls((0.0, 0.0), np.zeros(rows.shape[0]), np.zeros(rows.shape[0]))
        low, high = rows.min(axis=1), rows.max(axis=1)
        signal = np.einsum("ij,ij->i", rows, rows).astype(np.float64)
        return cls((float(low.min()), float(high.max())), np.maximum(-low, high).astype(np.float64), signal)

    @property
    def spread(self) -> float:
        """``max / median`` of the rows' largest ``|w|`` (inf when the median is 0 and the max is not; 1 when all are 0)."""
        median, top = float(np.median(self.largest)), float(self.largest.max(initial=0))
        if median == 0:
            return 1.0 if top == 0 else math.inf
        return top / median


def int8_sqnr_db(rows: np.ndarray, figures: RowFigures, per_channel: bool) -> float:
    """Symmetric int8 of ``rows`` with one step per row or one for all: the median over rows with a non-zero
    signal of ``10 log10(Σ w² / Σ (w - q)²)``; inf without noise.

    One scratch array, every step in place (the weights can be large). No clip: the step is the largest
    ``|w|`` over 127, so ``|w| / step`` rounds to at most 127.
    """
    largest = figures.largest[:, None] if per_channel else figures.largest.max(initial=0)
    # An all-zero row quantizes exactly with any step. (In the rows' dtype: a float64 step would widen them.)
    step = np.where(largest > 0, largest / INT8_LEVELS, 1.0).astype(rows.dtype)
    error = np.divide(rows, step)
    np.rint(error, out=error)
    error *= step
    error -= rows
    noise = np.einsum("ij,ij->i", error, error).astype(np.float64)
    kept = figures.signal > 0
    if not kept.any():
        return math.inf
    with np.errstate(divide="ignore", invalid="ignore"):  # noise 0: an exact channel, inf dB (NaN for NaN/Inf weights)
        per_row = 10 * np.log10(figures.signal[kept] / noise[kept])
    return float(np.median(per_row))


def half_precision_counts(values: list[np.ndarray], dtype: str) -> tuple[int, int]:
    """How many of ``values`` (float arrays) round to Inf in ``dtype``, and how many non-zero ones lie below
    its smallest normal magnitude: by comparing magnitudes with both thresholds (numpy's float16 rounding
    is slow, ~15 ns a value)."""
    target = numpy_dtype(dtype)
    threshold, smallest_normal = overflow_threshold(target), float(ml_dtypes.finfo(target).smallest_normal)
    overflow = below = 0
    for array in values:
        magnitude = np.abs(array)
        overflow += int(np.count_nonzero((magnitude >= threshold) & (magnitude < math.inf)))
        zeros = magnitude.size - int(np.count_nonzero(magnitude))
        below += int(np.count_nonzero(magnitude < smallest_normal)) - zeros
    return overflow, below


def named_channels(
    scale: np.ndarray,
    gamma: np.ndarray | None = None,
    mean: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    eps: float | None = None,
) -> tuple[ChannelStatistics, ...]:
    """The :data:`NAMED_CHANNELS` channels of largest ``|scale|`` (lowest index first among equals)."""
    order = np.argsort(-np.abs(scale), kind="stable")[:NAMED_CHANNELS]

    def at(array: np.ndarray | None, channel: int) -> float | None:
        return None if array is None else float(array.reshape(-1)[channel])

    return tuple(
        ChannelStatistics(int(c), float(scale[c]), at(gamma, c), at(mean, c), at(variance, c), eps) for c in order
    )


def measure_fold(
    weight_before: np.ndarray,
    weight_after: np.ndarray,
    layout: WeightLayout,
    channels: tuple[ChannelStatistics, ...],
    *,
    bias_before: np.ndarray | None = None,
    bias_after: np.ndarray | None = None,
    target_dtype: str | None = None,
    batchnorm_parameters: BatchNormParameters | None = None,
    batchnorm: str = "",
    layer: str = "",
    direction: str = "into-preceding",
    graph: str = "",
) -> LayerQuantization:
    """The figures of one fold: the layer's weight before and after (any float dtype, same ``layout``), the
    BatchNorm channels to name (:func:`named_channels`), the biases for ``target_dtype``, and the BatchNorm's
    parameters for the half-precision error against the unfolded layer (none for a bare ``x * scale + shift``)."""
    check_target_dtype(target_dtype)
    # Weights of float32 or narrower are measured in float32: half the memory traffic of float64, the figures
    # within 1e-5 relative (the per-row sums of squares round in float32).
    wide = np.float64 in (np.asarray(weight_before).dtype, np.asarray(weight_after).dtype)
    dtype = np.float64 if wide else np.float32
    before, after = output_channel_rows(weight_before, layout, dtype), output_channel_rows(weight_after, layout, dtype)
    figures_before, figures_after = RowFigures.of(before), RowFigures.of(after)
    target = None
    if target_dtype is not None:
        overflow_before, below_before = half_precision_counts([before, *_present(bias_before)], target_dtype)
        overflow, below = half_precision_counts([after, *_present(bias_after)], target_dtype)
        largest = max(float(figures_after.largest.max(initial=0)), float(np.abs(_flat(bias_after)).max(initial=0)))
        values = after.size + _flat(bias_after).size
        error = None
        if batchnorm_parameters is not None:
            error = compare_half_precision(
                before, bias_before, after, bias_after, layout, direction, batchnorm_parameters, target_dtype
            )
        target = HalfPrecision(target_dtype, overflow, overflow_before, below, below_before, values, largest, error)
    return LayerQuantization(
        batchnorm=batchnorm,
        layer=layer,
        direction=direction,
        graph=graph,
        range_before=figures_before.range,
        range_after=figures_after.range,
        channel_spread_before=figures_before.spread,
        channel_spread_after=figures_after.spread,
        int8_per_tensor_db_before=int8_sqnr_db(before, figures_before, per_channel=False),
        int8_per_tensor_db=int8_sqnr_db(after, figures_after, per_channel=False),
        int8_per_channel_db=int8_sqnr_db(after, figures_after, per_channel=True),
        channels=channels,
        target=target,
    )


def _present(array: np.ndarray | None) -> list[np.ndarray]:
    return [] if array is None else [array]


def _flat(array: np.ndarray | None) -> np.ndarray:
    return np.zeros(0) if array is None else np.asarray(array, dtype=np.float64).reshape(-1)


def format_table(layers: list[LayerQuantization]) -> list[str]:
    """The text report's lines: one per flagged layer, and how many were measured and not flagged."""
    flagged = [layer for layer in layers if layer.flags]
    lines = [
        f"quantization: {len(flagged)} of {len(layers)} folded layer(s) flagged "
        f"(per-tensor int8 loses > {INT8_LOSS_FLAG_DB:g} dB through the fold, or the target dtype overflows or "
        f"gets > {BELOW_NORMAL_FLAG_SHARE:.0%} more values below its normal range, or evaluating in it errs "
        f"> {FOLDED_ERROR_FLAG_RATIO:g}x more than unfolded)"
    ]
    if not flagged:
        return lines
    lines.append("  layer | int8 per-tensor dB before -> after | per-channel dB | spread after | largest |scale| channels")
    for layer in flagged:
        named = ", ".join(_describe_channel(channel) for channel in layer.channels)
        half = ""
        t = layer.target
        if t is not None and t.lossy:
            half = f" | {t.dtype}: {t.overflow} overflow, {t.below_normal} below normal (before {t.below_normal_before})"
        if t is not None and t.error is not None and t.error.worse:
            e = t.error
            half += (
                f" | {e.dtype} error {e.ratio:.3g}x unfolded's in channel {e.channel} ({e.folded_error:.3g} against "
                f"{e.unfolded_error:.3g}, output rms {e.output_rms:.3g}; {e.channels_worse} of {e.channels} channels > "
                f"{FOLDED_ERROR_FLAG_RATIO:g}x)"
            )
        lines.append(
            f"  {layer.layer} | {layer.int8_per_tensor_db_before:.1f} -> {layer.int8_per_tensor_db:.1f} | "
            f"{layer.int8_per_channel_db:.1f} | {layer.channel_spread_after:.3g} | {named}{half}"
        )
    return lines


def _describe_channel(channel: ChannelStatistics) -> str:
    statistics = "" if channel.gamma is None else f" (γ {channel.gamma:.3g}, var {channel.variance:.3g}, eps {channel.eps:g})"
    return f"{channel.channel}: {channel.scale:.3g}{statistics}"


def statistics_estimate(scale: np.ndarray, shift: np.ndarray) -> tuple[float, int]:
    """What folding a BatchNorm would do, from its statistics alone (the layer's weights unknown):
    ``20 log10(max |s| / median |s|)``, the dB per-tensor int8 loses on the median channel when every
    channel's weights had the same range before the fold (its step grows by that ratio against its range),
    and how many of its shifts (the folded bias of a layer without one) overflow float16."""
    magnitude = np.abs(scale)
    median, top = float(np.median(magnitude)), float(magnitude.max())
    if top == 0:
        lost = 0.0
    else:
        lost = math.inf if median == 0 else 20 * math.log10(top / median)
    return lost, half_precision_counts([shift], "float16")[0]
