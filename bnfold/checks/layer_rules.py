"""The static rules, on layer descriptions that the ONNX and PyTorch inspectors both produce.

Each inspector reads its model into :class:`BatchNormState` and :class:`DropoutState` records (what
mode the layer is in, and why; its statistics as float64 arrays); the rules here turn those into
findings, so one rule serves both front-ends. Broken statistics are found by
:func:`bnfold.fold_math.batchnorm_affine`, the same test that decides whether a fold is possible.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bnfold.checks.findings import Finding
from bnfold.fold_math import ChannelAffine, UnfoldableStatisticsError, batchnorm_affine
from bnfold.quantization import INT8_LOSS_FLAG_DB, LayerQuantization, statistics_estimate

# Past this |γ| / sqrt(var + eps), a channel multiplies its input (and, once folded, its weights) by
# more than float32's relative precision can spare: 1e4 eats 4 of its ~7 significant digits.
LARGE_SCALE = 1e4

_BATCH_STATISTICS = "it normalises with the statistics of the current batch"


@dataclasses.dataclass(frozen=True)
class Statistics:
    """A BatchNorm's parameters and running statistics, float64, one entry per channel."""

    weight: np.ndarray | None  # None when affine=False (γ = 1)
    bias: np.ndarray | None  # None when affine=False (β = 0)
    running_mean: np.ndarray
    running_var: np.ndarray
    eps: float
    batches_tracked: int | None = None  # PyTorch's num_batches_tracked; None when the format has none


@dataclasses.dataclass(frozen=True)
class BatchNormState:
    name: str
    training: str | None  # why it normalises with batch statistics, e.g. "training_mode=1"; None in eval mode
    tracks_running_stats: bool = True
    statistics: Statistics | None = None  # None when they are not constants the inspector can read


@dataclasses.dataclass(frozen=True)
class DropoutState:
    name: str
    training: str | None  # why it drops at inference, e.g. "module.training is True"; None when inactive
    probability: float | None  # None when it is not a constant
    drops: str = "of its inputs"  # what it zeroes: inputs, or whole samples of a branch (drop path), or blocks


LayerState = BatchNormState | DropoutState


def layer_findings(states: list[LayerState]) -> list[Finding]:
    findings = []
    for state in states:
        findings += batchnorm_findings(state) if isinstance(state, BatchNormState) else dropout_findings(state)
    return findings


def batchnorm_findings(state: BatchNormState) -> list[Finding]:
    findings = []
    if not state.tracks_running_stats:
        findings.append(Finding("BN002", state.name, f"no running statistics (track_running_stats=False): {_BATCH_STATISTICS}"))
    elif state.training:
        findings.append(Finding("BN001", state.name, f"training mode ({state.training}): {_BATCH_STATISTICS}"))
    if state.statistics is not None:
        findings.extend(statistics_findings(state.name, state.statistics))
    return findings


def dropout_findings(state: DropoutState) -> list[Finding]:
    if not state.training or state.probability == 0:
        return []  # inactive, or active with nothing to drop
    rate = "an unknown fraction" if state.probability is None else f"{state.probability:.0%}"
    return [Finding("DO001", state.name, f"training mode ({state.training}): it zeroes {rate} {state.drops} at random")]


def statistics_findings(name: str, statistics: Statistics) -> list[Finding]:
    sizes = {
        label: array.shape
        for label, array in zip(_STATISTIC_NAMES, (statistics.weight, statistics.bias, statistics.running_mean, statistics.running_var))
        if array is not None
    }
    if len(set(sizes.values())) > 1 or any(len(shape) != 1 for shape in sizes.values()):
        described = ", ".join(f"{label} of shape {list(shape)}" for label, shape in sizes.items())
        return [Finding("BN004", name, f"its statistics do not give one value per channel: {described}")]
    if not statistics.running_mean.size:
        return []  # no channels: nothing to normalise
    findings = _untrained_findings(name, statistics)
    try:
        affine = batchnorm_affine(
            statistics.weight, statistics.bias, statistics.running_mean, statistics.running_var, statistics.eps
        )
    except UnfoldableStatisticsError as error:
        return [*findings, Finding("BN004", name, str(error))]
    return [
        *findings,
        *_precision_findings(name, statistics, np.abs(affine.scale)),
        *_quantization_findings(name, statistics, affine),
    ]


_STATISTIC_NAMES = ("weight", "bias", "running mean", "running variance")


def _untrained_findings(name: str, statistics: Statistics) -> list[Finding]:
    # 0 and 1 are PyTorch's initial values; trained statistics are never exactly that across a layer. A count of
    # 0 beside other statistics is no sign: load_state_dict fills in 0 for a checkpoint without the count.
    channels = statistics.running_var.size
    if channels > 1 and np.all(statistics.running_var == 0):
        # Training gives a variance of exactly 0 only to a channel whose input never varies (a dead channel), never
        # to every channel of a layer; zeros are what an uninitialised buffer or a converter that lost them leaves.
        return [
            Finding(
                "BN003",
                name,
                f"running variance is exactly 0 in all {channels} channels: the statistics were never filled in (buffers "
                "created as zeros, or lost by a converter or checkpoint), and the layer multiplies by |γ|/sqrt(eps)",
            )
        ]
    if not (np.all(statistics.running_mean == 0) and np.all(statistics.running_var == 1)):
        return []
    reasons = [f"running mean is exactly 0 and variance exactly 1 in all {statistics.running_mean.size} channels"]
    if statistics.batches_tracked == 0:
        reasons.append("num_batches_tracked is 0")
    return [Finding("BN003", name, f"{' and '.join(reasons)}: the running statistics were never updated by training")]


def _precision_findings(name: str, statistics: Statistics, scale: np.ndarray) -> list[Finding]:
    large = np.flatnonzero(scale > LARGE_SCALE)
    if not large.size:
        return []
    worst = large[np.argmax(scale[large])]
    gamma = 1.0 if statistics.weight is None else statistics.weight.reshape(-1)[worst]
    return [
        Finding(
            "BN005",
            name,
            f"|γ|/sqrt(var+eps) exceeds {LARGE_SCALE:g} in {large.size} channel(s); worst channel {worst}: "
            f"{scale[worst]:.3g} (γ {gamma:.3g}, var {statistics.running_var.reshape(-1)[worst]:.3g}, eps {statistics.eps:g})",
        )
    ]


def _quantization_findings(name: str, statistics: Statistics, affine: ChannelAffine) -> list[Finding]:
    """BN007 from the statistics alone (:func:`bnfold.quantization.statistics_estimate`); the inspectors
    replace the estimates with the measured figures of the folds, when they can plan them
    (:func:`with_measured_quantization`)."""
    lost, overflow = statistics_estimate(affine.scale, affine.shift)
    problems = []
    if lost > INT8_LOSS_FLAG_DB:
        worst = int(np.argmax(np.abs(affine.scale)))
        gamma = 1.0 if statistics.weight is None else statistics.weight.reshape(-1)[worst]
        problems.append(
            f"per-tensor int8 of the folded layer would lose about {lost:.1f} dB (max/median |γ|/sqrt(var+eps) "
            f"{10 ** (lost / 20):.3g}, estimated from the statistics, the layer's weights assumed even); channel {worst}: "
            f"scale {affine.scale[worst]:.3g} (γ {gamma:.3g}, var {statistics.running_var.reshape(-1)[worst]:.3g}, "
            f"eps {statistics.eps:g})"
        )
    if overflow:
        problems.append(f"{overflow} folded shift(s) β - mean·γ/sqrt(var+eps) overflow float16")
    return [Finding("BN007", name, "; ".join(problems))] if problems else []


def with_measured_quantization(findings: list[Finding], measured: list[LayerQuantization] | None) -> list[Finding]:
    """``findings`` with BN007 measured on the folds the fold would make (:mod:`bnfold.quantization`, float16 as
    the target) in place of the estimates: a BatchNorm the fold leaves makes nothing lossy. ``measured`` None
    (the folds cannot be planned) keeps the estimates."""
    if measured is None:
        return findings
    kept = [finding for finding in findings if finding.code != "BN007"]
    return kept + [Finding("BN007", layer.batchnorm, _describe_measured(layer)) for layer in measured if layer.flags]


def _describe_measured(layer: LayerQuantization) -> str:
    problems = []
    if "int8" in layer.flags:
        channels = ", ".join(
            f"{c.channel} (scale {c.scale:.3g}, γ {c.gamma:.3g}, var {c.variance:.3g}, eps {c.eps:g})" for c in layer.channels
        )
        problems.append(
            f"folded into {layer.layer}, per-tensor int8 SQNR {layer.int8_per_tensor_db_before:.1f} -> "
            f"{layer.int8_per_tensor_db:.1f} dB ({layer.int8_db_lost:.1f} dB lost; per-channel int8 keeps "
            f"{layer.int8_per_channel_db:.1f} dB); largest |γ|/sqrt(var+eps): channels {channels}"
        )
    target = layer.target
    if target is not None and target.lossy:
        problems.append(
            f"folded into {layer.layer}, {target.overflow} value(s) overflow {target.dtype} and {target.below_normal} "
            f"fall below its normal range ({target.below_normal_before} before the fold)"
        )
    if target is not None and target.error is not None and target.error.worse:
        error = target.error
        problems.append(
            f"folded into {layer.layer}, evaluated in {error.dtype} it errs {error.ratio:.3g}x more than unfolded in "
            f"channel {error.channel} ({error.folded_error:.3g} against {error.unfolded_error:.3g}, output rms "
            f"{error.output_rms:.3g}; {error.channels_worse} of {error.channels} channels worse)"
        )
    return "; ".join(problems)
