"""Output comparison shared by the front-ends: dtype-based tolerances and the error figures."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

import ml_dtypes
import numpy as np

from bnfold.errors import VerificationError, VerificationUnavailableError  # noqa: F401 (their home before bnfold.errors)
from bnfold.fold_math import BLOCK_ELEMENTS, ExactFold, ScaledRows, WeightLayout, rows_per_block

# (atol, rtol) per output dtype; an output passes when max |folded - original| <= atol + rtol * max |original|
# over its finite elements. The rounding error of an element scales with the sums that produced it, not
# with the element's own value, so the tolerance scales with the output's magnitude, not per element.
# These are loose on purpose: the per-fold checks below are what catch a wrong fold (a relative error of
# 1e-3 in one channel moves a ResNet-50's outputs by less than the float noise).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-12, 1e-9),
    "float32": (1e-6, 1e-3),
    "float16": (1e-3, 3e-2),
    "bfloat16": (1e-2, 1e-1),
}

# Per-fold check: the folded layer runs on the original model's own input to it, beside the original layer
# and BatchNorm. Each element's difference is taken in units of eps(dtype) x sqrt(sum (w x)^2 + c^2) over the
# terms the folded layer sums (the size of their rounding, summed at random signs: an output that is a small
# remainder of large terms carries their rounding), c the size of the terms summed into its bias element
# (ExactFold.bias_terms: the original's BatchNorm rounds at the size of |s mean| and |beta| however much they
# cancel, and so the candidate's own bias cannot widen its tolerance), and channel c passes when the root mean
# square of those over its elements is within UNITS.
# float32: both sides carry the runtime's own rounding of the sums and the BatchNorm. Correct folds of the
# realistic architectures measure up to 230 units (ShuffleNetV2), up to 392 with BatchNorm gammas x3.5
# (logits 1.5e6); one channel's scale off by a relative 1e-3 measures 1556-6328 on ResNet-50. (Measured with the
# folded bias in place of c, before a60292f; c is at least as large, so these can only be lower now; the tests
# that corrupt one channel's scale by 1e-3 still fail it.)
# float16/bfloat16: both sides run in float32 (bnfold.onnx_fold.local_checks.append_local_checks), so they differ by the folded
# weights' rounding to the half dtype alone, at most half an ulp each. One channel's error is nearly one draw
# (its elements share the weights' rounding), so over a model's tens of thousands of channels the largest
# reaches ~4 sigma of 0.29 units, plus up to 0.5 from the bias: correct folds of ResNet-50 with near-dead
# channels measure at most 0.8; one channel's scale off by a relative 1e-2 measures 3-10, but only ~1 in a
# channel whose output is a small remainder of its terms (a 2048-wide 1x1 conv): this bound lets that pass
# rather than reject correct folds, and the parameter check below catches it.
LOCAL_UNITS: dict[str, float] = {"float64": 1024.0, "float32": 1024.0, "float16": 2.0, "bfloat16": 2.0}

# Parameter check, where the fold is known: the folded layer's weight and bias against the exact (float64)
# fold of the original's, each element's error in units of eps(dtype) x its rounding scale: |exact value| for
# the weight, the size of the terms summed for the bias (|s b| + |s mean| + |beta| backward; |b| + sum |W t|
# forward), at least the dtype's smallest subnormal. bnfold rounds once (at most 0.5); a fold computed in
# float32 (onnxruntime's optimiser, torch.fx's fuse, onnxoptimizer's arithmetic) carries the rounding of
# s = gamma / sqrt(var + eps) and of the product or sum: up to 1.7 units on the test architectures, 0.5 once
# rounded to float16. One channel's scale off by a relative 1e-3 in float32 is 8389 units, by 1e-2 in float16
# 10.2 (11 at a channel's worst element), and a bias off by 1e-3 of its channel's range at least 60 over
# ResNet-50's channels (most are thousands): where the layer's output is a small remainder of its terms, the
# layer-output check above sees these at ~1 unit (float16) or ~57 (float32); the parameters show them whole.
PARAMETER_UNITS: dict[str, float] = {"float64": 16.0, "float32": 16.0, "float16": 4.0, "bfloat16": 4.0}


@dataclasses.dataclass(frozen=True)
class Overrides:
    """How the user who reads a failure overrides verification: the keyword arguments of bnfold.fold and
    bnfold.fold_onnx, or the command line's flags."""

    template: str  # an option with its value, from ``name`` and ``value``
    skip: str

    def option(self, name: str, value: str = "") -> str:
        return self.template.format(name=name, value=value).strip()


PYTHON_OVERRIDES = Overrides("{name}={value}", "verify=False")
CLI_OVERRIDES = Overrides("--{name} {value}", "--no-verify")


def rounding_unit(dtype_name: str) -> float:
    """The machine epsilon of ``dtype_name`` (0 for non-floats: exact)."""
    try:
        return float(ml_dtypes.finfo(np.dtype(getattr(ml_dtypes, dtype_name, dtype_name))).eps)
    except (TypeError, ValueError):
        return 0.0


def tolerance(name: str, value: float | None) -> float | None:
    """An explicit tolerance (``atol``, ``rtol``) as a float, refused unless it is a finite real number >= 0: NaN
    compares false with every error, so ``rtol=nan`` passed any difference. (A float: numpy's and Fraction's do not
    go into the JSON report.)"""
    if value is None:
        return None
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return float(value)


def tolerances_for(dtype_name: str, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """The (atol, rtol) for an output of ``dtype_name``, with explicit overrides; exact for non-floats."""
    default_atol, default_rtol = DEFAULT_TOLERANCES.get(dtype_name, (0.0, 0.0))
    return (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)


# What the random inputs of one verification or batch-dependence measurement may take in all, checked
# before any is made: a model may declare any shape ([1, 3, 100000, 100000] float32 is 112 GiB).
RANDOM_INPUT_BUDGET_BYTES = 2 * 2**30


def over_random_input_budget(inputs: dict[str, tuple[list[int], str, int]]) -> tuple[str, str] | None:
    """``(largest input, what the inputs would take against the budget)`` when random inputs of these
    ``name: (shape, dtype name, bytes per element)`` exceed :data:`RANDOM_INPUT_BUDGET_BYTES`, else None."""
    sizes = {name: math.prod(shape) * itemsize for name, (shape, _, itemsize) in inputs.items()}
    total = sum(sizes.values())
    if total <= RANDOM_INPUT_BUDGET_BYTES:
        return None
    largest = max(sizes, key=sizes.__getitem__)
    shape, dtype, _ = inputs[largest]
    with_others = f" ({gib(total)} with the other inputs)" if total > sizes[largest] else ""
    return largest, (
        f"input {largest!r} of shape {shape} {dtype} takes {gib(sizes[largest])}{with_others}, over the "
        f"{gib(RANDOM_INPUT_BUDGET_BYTES)} budget for random inputs"
    )


def gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"


Status = Literal["passed", "failed", "not compared"]

# Kinds of array whose elements are not real numbers: nothing in them to hold to a tolerance.
_NOT_REAL_KINDS = "cmMOSU"


# How much further from a float64 run of the original a folded float32 model's output may be than the original's own
# float32 run (from a float32 run, a float16 or bfloat16 model's), when every fold passed its own check (see
# OutputComparison.measure_noise): the folded model rounds its weights once more, then runs with its own rounding.
# Measured on correct folds of timm models with untrained weights: 1.25 (efficientnetv2_rw_t, 3.3e4 against 2.6e4),
# up to 2.5 (fbnetv3_b, 0.135 against 0.054).
EXACT_DISTANCE_RATIO = 4


@dataclasses.dataclass
class OutputComparison:
    """One output. Errors are over the ``elements_compared`` elements (None when there are none);
    ``max_rel_error`` is ``max_abs_error / magnitude``, the magnitude being max |original| over them;
    ``noise`` is how far a run of the original with other kernels, as ``noise_from`` says, is from the compared
    one, in ``noise_elements`` elements (measured only when the output failed, see :meth:`measure_noise`);
    ``reason`` says why the output failed or was not compared."""

    name: str
    dtype: str
    status: Status
    elements: int
    elements_compared: int
    max_abs_error: float | None
    max_rel_error: float | None
    atol: float
    rtol: float
    reason: str = ""
    magnitude: float | None = None
    noise: float | None = None
    noise_elements: int | None = None
    noise_from: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}

    def measure_noise(
        self,
        expected: np.ndarray,
        other: np.ndarray,
        actual: np.ndarray,
        noise_from: str,
        folds_proven: bool = False,
        allowances: bool = True,
        exact: bool = False,
    ) -> None:
        """Set ``noise`` (the largest difference) and ``noise_elements`` (how many differ) between ``expected``, the
        original's run that was compared, and ``other``, a run of the original with other kernels or in a wider
        dtype, as ``noise_from`` says; then pass a failed integer output (compared exactly) that the fold
        (``actual``) changes no more than that: a float value rounded or cast to an integer, or ranked by ArgMax,
        flips where it sits on a boundary, and any change of float rounding (other kernels, the runtime's fusions, a
        fold) flips some. A wrong fold changes more values, or by more. With ``folds_proven`` (every fold passed its
        own check), a failed float output within the noise passes too: the model amplifies rounding that much itself
        (a float16 model with float32 outputs, a division near zero, a deep network with untrained weights). With
        ``exact`` (``other`` is a run of the original in a wider dtype, float64 for float32, the result its run
        approximates), that is: the folded output no further from ``other`` than :data:`EXACT_DISTANCE_RATIO` times the original's own distance
        from it. Neither allowance is made without ``allowances`` (tolerances the user set are the criterion).
        Elements that are not finite in either run are no noise (an overflow in one)."""
        expected64, other64 = np.asarray(expected, np.float64), np.asarray(other, np.float64)
        if expected64.shape != other64.shape:
            return
        finite = np.isfinite(expected64) & np.isfinite(other64)
        noise = np.abs(other64[finite] - expected64[finite])
        self.noise = float(noise.max()) if noise.size else 0.0
        self.noise_elements = int(np.count_nonzero((expected64 != other64) & ~(np.isnan(expected64) & np.isnan(other64))))
        self.noise_from = noise_from
        if not (self.failed and self.magnitude is not None and allowances):
            return
        if folds_proven and self.dtype in DEFAULT_TOLERANCES:
            if exact:
                with np.errstate(invalid="ignore"):
                    distance = float(np.max(np.abs(np.asarray(actual, np.float64)[finite] - other64[finite]), initial=0.0))
                within = distance <= EXACT_DISTANCE_RATIO * self.noise
                figures = f"the folded output is {distance:.3g} from a run of the original in a wider dtype, the original {self.noise:.3g}"
            else:
                within = self.max_abs_error <= self.noise
                figures = f"the output differs by no more than the original's own float noise ({noise_from}), {self.noise:.3g}"
            if within:
                self.status = "passed"
                self.reason = f"every fold passed its own check, and {figures}: rounding the model amplifies"
                return
        if not np.issubdtype(np.dtype(self.dtype), np.integer):
            return
        differing = int(np.count_nonzero(np.asarray(actual) != np.asarray(expected)))
        # A fold rounds the weights besides reordering the sums: up to about twice the flips the other run shows
        # (measured: 121 against 81 without oneDNN), give or take three standard deviations of such a count.
        allowed = 2 * self.noise_elements + 3 * math.sqrt(2 * self.noise_elements) + 3
        if self.max_abs_error <= self.noise and differing <= allowed:
            self.status = "passed"
            self.reason = (
                f"integer output: {differing} value(s) differ, by up to {self.max_abs_error:g}; the original's own float "
                f"noise ({noise_from}) changes {self.noise_elements}, by up to {self.noise:g}: float rounding flipping "
                "values that sit on a boundary"
            )

    def describe_failure(self) -> str:
        if self.magnitude is None:
            return f"output {self.name!r}: {self.reason}"
        allowed = self.atol + self.rtol * self.magnitude
        noise = "" if self.noise is None else f"; the model's own float noise is {self.noise:.3g} ({self.noise_from})"
        return (
            f"output {self.name!r}: max abs error {self.max_abs_error:.3g} on outputs of magnitude {self.magnitude:.3g} "
            f"(max |original|), {self.max_rel_error:.3g} of it, over the {allowed:.3g} allowed (atol {self.atol:g} + "
            f"rtol {self.rtol:g} x magnitude){noise}"
        )


@dataclasses.dataclass
class ParameterComparison:
    """A folded layer's weight and bias against the exact fold of the original's (see PARAMETER_UNITS):
    ``units`` at the worst element, in ``parameter`` ("weight" or "bias") of output ``channel``, where the
    error is ``error`` against a rounding scale ``magnitude``; passes within ``allowed_units``. ``reason``
    says why nothing could be compared element by element (the shapes differ)."""

    parameter: str
    dtype: str
    channel: int | None
    units: float
    allowed_units: float
    error: float | None = None
    magnitude: float | None = None
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.units <= self.allowed_units


def compare_parameters(
    exact: ExactFold, weight: np.ndarray, bias: np.ndarray | None, layout: WeightLayout, rtol: float | None = None
) -> ParameterComparison:
    """The worst element of ``weight`` and ``bias`` (None: zero) against ``exact``, in units of each
    parameter's own dtype. An explicit ``rtol`` allows at least ``rtol`` / eps units."""
    dtype_name = str(weight.dtype)
    eps = rounding_unit(dtype_name)
    allowed = max(PARAMETER_UNITS.get(dtype_name, 0.0), (rtol or 0.0) / eps if eps else 0.0)
    if weight.shape != exact.weight.shape:
        found = f"the folded weight has shape {list(weight.shape)} where the fold gives {list(exact.weight.shape)}"
        return ParameterComparison("weight", dtype_name, None, math.inf, allowed, reason=found)
    bias = np.zeros((), weight.dtype) if bias is None else bias
    try:
        bias, exact_bias, bias_terms = np.broadcast_arrays(bias, exact.bias, exact.bias_terms)
    except ValueError:
        found = f"the folded bias has shape {list(bias.shape)} where the fold gives {list(exact.bias.shape)}"
        return ParameterComparison("bias", str(bias.dtype), None, math.inf, allowed, reason=found)
    candidates = []
    for name, actual, expected, scale in (("weight", weight, exact.weight, None), ("bias", bias, exact_bias, bias_terms)):
        index, units, error = _worst_parameter_element(actual, expected, scale)
        # The worst element's output channel: weights by the layout, biases on their last axis.
        if name == "weight":
            marker = np.zeros(actual.shape, bool)
            marker.reshape(-1)[index] = True
            channel = int(np.argmax(layout.grouped_view(marker)[0].max(axis=(2, 3)).reshape(-1)))
        else:
            channel = index % actual.shape[-1] if actual.ndim else 0
        magnitude = abs(_element(expected, index)) if scale is None else float(scale.reshape(-1)[index])
        candidates.append(ParameterComparison(name, str(actual.dtype), channel, units, allowed, error, magnitude))
    return max(candidates, key=lambda comparison: comparison.units)


def _element(values: np.ndarray | ScaledRows, index: int) -> float:
    return values.element(index) if isinstance(values, ScaledRows) else float(values.reshape(-1)[index])


def _blocks(values: np.ndarray | ScaledRows):
    """``(first flat index, values)`` of consecutive blocks of about :data:`BLOCK_ELEMENTS` elements."""
    if isinstance(values, ScaledRows):
        yield from values.row_blocks()
        return
    flat = values.reshape(-1)
    for start in range(0, flat.size, BLOCK_ELEMENTS):
        yield start, flat[start : start + BLOCK_ELEMENTS]


def _worst_parameter_element(actual: np.ndarray, exact: np.ndarray | ScaledRows, scale: np.ndarray | None) -> tuple[int, float, float]:
    """The flat index, units and |error| of the element of ``actual`` furthest from ``exact`` in units of
    eps x ``scale`` (None: |exact|), at least the smallest subnormal, of ``actual``'s dtype; NaN or Inf
    in ``actual`` is infinitely many units."""
    finfo = ml_dtypes.finfo(actual.dtype)
    eps, smallest = float(finfo.eps), float(finfo.smallest_subnormal)
    actual = actual.reshape(-1)
    scale = None if scale is None else scale.reshape(-1)
    worst = (0, -1.0, 0.0)
    for start, expected in _blocks(exact):
        block = slice(start, start + expected.size)
        found = None if scale is not None else _worst_relative_error(actual[block], expected, eps, smallest)
        if found is None:
            found = _worst_in_units(actual[block], expected, None if scale is None else scale[block], eps, smallest)
        at, value, error = found
        if value > worst[1]:
            worst = (start + at, value, error)
    return worst


def _worst_in_units(actual: np.ndarray, expected: np.ndarray, scale: np.ndarray | None, eps: float, smallest: float) -> tuple[int, float, float]:
    error = actual.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        error -= expected
        np.abs(error, out=error)
    unit = np.abs(expected) if scale is None else scale.astype(np.float64)
    unit *= eps
    np.maximum(unit, smallest, out=unit)
    units = np.divide(error, unit, out=unit)
    at = int(np.argmax(units))  # (the first NaN, if there is one)
    value = math.inf if math.isnan(units[at]) else float(units[at])
    return at, value, math.inf if math.isnan(error[at]) else float(error[at])


def _worst_relative_error(actual: np.ndarray, expected: np.ndarray, eps: float, smallest: float) -> tuple[int, float, float] | None:
    """:func:`_worst_in_units` against |expected| in five passes over the block, not eight: |actual - expected| / |expected|
    / eps is the same number (eps is a power of two) wherever eps |expected| is at least ``smallest``. None where it
    cannot tell: a NaN or 0/0 in the block, or the worst element at a smaller ``expected``."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        relative = actual.astype(np.float64)  # (then float64 loops: numpy's mixed-type loops are slower)
        relative -= expected
        relative /= expected
        np.abs(relative, out=relative)
    at = int(np.argmax(relative))  # (the first NaN, if there is one)
    largest = float(relative[at])
    if not math.isfinite(largest) or abs(float(expected[at])) * eps < smallest:
        return None
    return at, largest / eps, abs(float(actual[at]) - float(expected[at]))


@dataclasses.dataclass
class FoldCheck:
    """One fold checked on its own: the folded layer run on the original model's input to it, against the
    original layer and BatchNorm, channel by channel. ``units`` is the worst channel's error in units of
    eps(dtype) x each element's magnitude, root mean square over the channel's elements (see LOCAL_UNITS);
    it passes within ``allowed_units``. ``max_abs_error`` and ``magnitude`` are at that channel's largest error. Not compared (``reason`` says why) when the fold
    can only be checked through the model's outputs. ``parameters`` is the parameter check (see PARAMETER_UNITS),
    None where the original's parameters were not at hand; the fold fails when either check does."""

    fold: str
    dtype: str
    status: Status
    channels: int = 0
    channel: int | None = None
    max_abs_error: float | None = None
    magnitude: float | None = None
    units: float | None = None
    allowed_units: float = 0.0
    reason: str = ""
    parameters: ParameterComparison | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def parameters_failed(self) -> bool:
        return self.parameters is not None and not self.parameters.passed

    @property
    def excess(self) -> float:
        """How far past its allowance the fold is: the larger of its checks' units over their allowed units."""
        layer = math.inf if self.units is None else self.units / self.allowed_units if self.allowed_units else 0.0
        parameters = 0.0 if self.parameters is None else self.parameters.units / self.parameters.allowed_units
        return max(layer, parameters)


def fold_not_checked(fold: str, reason: str) -> FoldCheck:
    return FoldCheck(fold, "", "not compared", reason=reason)


def folds_proven(checks: list[FoldCheck], folds: int) -> bool:
    """Whether each of the ``folds`` passed its own check on its layer's output (see OutputComparison.measure_noise)."""
    return len(checks) == folds and all(check.status == "passed" and check.units is not None for check in checks)


def check_fold(
    fold: str,
    dtype_name: str,
    reference: np.ndarray,
    folded: np.ndarray,
    magnitude: np.ndarray,
    channel_axis: int,
    rtol: float | None = None,
    parameters: ParameterComparison | None = None,
) -> FoldCheck:
    """Compare a folded layer's output with the original's, per channel on ``channel_axis``, against
    ``magnitude`` (one per element of ``reference``): a channel's units are the root mean square over its
    elements of |error| / (eps x magnitude). An explicit ``rtol`` allows at least ``rtol`` / eps units.
    ``parameters`` (from :func:`compare_parameters`) is recorded with it, and fails it when it fails."""
    check = _compare_layer_outputs(fold, dtype_name, reference, folded, magnitude, channel_axis, rtol)
    check.parameters = parameters
    if check.parameters_failed:
        check.status = "failed"
    return check


def _compare_layer_outputs(fold, dtype_name, reference, folded, magnitude, channel_axis, rtol) -> FoldCheck:
    eps = rounding_unit(dtype_name)
    allowed = max(LOCAL_UNITS.get(dtype_name, 0.0), (rtol or 0.0) / eps if eps else 0.0)
    reference, folded, magnitude = (np.moveaxis(np.asarray(array), channel_axis, 0) for array in (reference, folded, magnitude))
    channels = reference.shape[0]
    if folded.shape != reference.shape:
        return FoldCheck(fold, dtype_name, "failed", channels, allowed_units=allowed,
                         reason=f"the folded layer gives shape {list(folded.shape)} where the original gives {list(reference.shape)}")  # fmt: skip
    reference, folded, magnitude = (array.reshape(channels, -1) for array in (reference, folded, magnitude))
    if not reference.size:
        return FoldCheck(fold, dtype_name, "passed", channels, 0, 0.0, 0.0, 0.0, allowed)
    by_channel = np.empty(channels)
    rows = rows_per_block(reference.shape[1])
    for start in range(0, channels, rows):
        block = slice(start, start + rows)
        by_channel[block] = _root_mean_square_units(reference[block], folded[block], magnitude[block], eps)
    channel = int(np.argmax(by_channel))
    diff, _ = _output_errors(reference[channel], folded[channel], magnitude[channel], eps)
    element = int(np.argmax(diff))
    worst = float(by_channel[channel])
    status: Status = "passed" if worst <= allowed else "failed"
    return FoldCheck(
        fold, dtype_name, status, channels, channel, float(diff[element]), float(magnitude[channel, element]), worst, allowed,
    )  # fmt: skip


def _root_mean_square_units(reference: np.ndarray, folded: np.ndarray, magnitude: np.ndarray, eps: float) -> np.ndarray:
    """Each row's root mean square of the units of :func:`_output_errors`, as the root mean square of
    error / magnitude over eps, in six passes over the rows, not nine; through :func:`_output_errors` where that
    is not finite (NaN or Inf brought in, a magnitude of 0)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = folded.astype(np.float64)  # (float64 operands: numpy's mixed-type loops are slower)
        ratio -= reference.astype(np.float64)
        ratio /= magnitude.astype(np.float64)
        root_mean_square = np.sqrt(np.einsum("ij,ij->i", ratio, ratio) / ratio.shape[1]) / eps
    if np.isfinite(root_mean_square).all():
        return root_mean_square
    _, units = _output_errors(reference, folded, magnitude, eps)
    with np.errstate(over="ignore"):
        return np.sqrt(np.mean(units * units, axis=1))


def _output_errors(reference: np.ndarray, folded: np.ndarray, magnitude: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Each element's |error| in float64, and that error in units of eps x its magnitude: NaN or Inf that
    the fold brought in is infinitely many; an element of magnitude 0 (all terms zero) must match exactly, one
    whose magnitude overflowed (Inf or NaN) counts 0."""
    diff = folded.astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff -= reference
        np.abs(diff, out=diff)
    scale = magnitude.astype(np.float64)
    scale *= eps
    with np.errstate(divide="ignore", invalid="ignore"):
        units = np.divide(diff, scale)
    if np.isfinite(units).all():  # (the usual case: finite values, no zero magnitude)
        return diff, units
    finite = np.isfinite(reference)
    diff[~finite] = 0.0
    diff[finite & ~np.isfinite(folded)] = math.inf
    # A term whose square overflows the dtype (a weight of 1e20 in float32) makes the rounding scale Inf, or NaN
    # where it meets a zero (Inf x 0, the padding): the error there is no measure of the fold, whose parameters
    # are checked exactly on their own; such an element counts 0 units.
    scale[np.isnan(scale) & (diff < math.inf)] = math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        units = np.where(diff == 0, 0.0, diff / scale)
    return diff, units


def not_compared(name: str, dtype: str, reason: str, atol: float | None = None, rtol: float | None = None) -> OutputComparison:
    """An output that is not a tensor of real numbers, so has nothing to hold to a tolerance."""
    atol, rtol = tolerances_for(dtype, atol, rtol)
    return OutputComparison(name, dtype, "not compared", 0, 0, None, None, atol, rtol, reason)


@dataclasses.dataclass
class Verification:
    """How the folded model's outputs compare with the original's on the same inputs. It passes only
    when some output was compared and every compared output is within tolerance."""

    outputs: list[OutputComparison]
    inputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # The front-end's account of why no output could be compared, when it has a better one than the
    # outputs' own reasons (a PyTorch forward that returned no tensor at all).
    nothing_compared: str = ""
    folds: list[FoldCheck] = dataclasses.field(default_factory=list)
    # The options a failure's reason names: the Python API's unless the command line says otherwise.
    overrides: Overrides = PYTHON_OVERRIDES

    @property
    def compared(self) -> list[OutputComparison]:
        return [output for output in self.outputs if output.status != "not compared"]

    @property
    def passed(self) -> bool:
        compared = self.compared
        return bool(compared) and all(output.passed for output in compared) and not self.failed_folds

    @property
    def failed_folds(self) -> list[FoldCheck]:
        return [check for check in self.folds if check.status == "failed"]

    @property
    def fold_noise(self) -> float | None:
        """The largest error, in rounding units, of the folds that passed: the float noise of this model's folds."""
        return max((c.units for c in self.folds if c.status == "passed" and c.units is not None), default=None)

    @property
    def parameter_noise(self) -> float | None:
        """The largest parameter error, in rounding units, of the folds that passed: their rounding."""
        return max((c.parameters.units for c in self.folds if c.status == "passed" and c.parameters), default=None)

    @property
    def max_abs_error(self) -> float | None:
        return max((o.max_abs_error for o in self.compared), default=None)

    @property
    def max_rel_error(self) -> float | None:
        return max((o.max_rel_error for o in self.compared), default=None)

    @property
    def reason(self) -> str:
        """Why the verification failed ("" when it passed): the worst failing output, or why nothing was compared."""
        failed_folds = self.failed_folds
        if failed_folds:
            worst_fold = max(failed_folds, key=lambda check: check.excess)
            return f"folded model differs from the original: {self._describe_fold_failure(worst_fold, len(failed_folds))}"
        failed = [output for output in self.outputs if output.failed]
        if failed:
            worst = max(failed, key=lambda o: o.max_abs_error)
            if math.isinf(worst.max_abs_error):  # NaN or Inf the fold brought in: no tolerance admits it
                return f"folded model differs from the original: output {worst.name!r}: {worst.reason}"
            options = f"{self.overrides.option('atol')}/{self.overrides.option('rtol')}"
            return (
                f"folded model differs from the original: {worst.describe_failure()}: {worst.reason}; if the "
                f"difference is acceptable, rerun with a larger {options} (or {self.overrides.skip})"
            )
        if self.compared:
            return ""
        if self.nothing_compared or not self.outputs:
            return f"nothing was compared: {self.nothing_compared or 'the model has no outputs'}"
        why = "; ".join(f"output {o.name!r}: {o.reason}" for o in self.outputs)
        return (
            f"nothing was compared: {why}; verify on inputs for which an output holds finite values (a detector's: "
            f"inputs it detects something in), or {self.overrides.skip}"
        )

    def _describe_fold_failure(self, check: FoldCheck, count: int) -> str:
        others = f" (and {count - 1} other fold(s))" if count > 1 else ""
        if check.parameters_failed:
            return f"fold {check.fold}{others}: {self._describe_parameter_failure(check.parameters)}"
        if check.units is None:
            return f"fold {check.fold}{others}: {check.reason}"
        noise = self.fold_noise
        measured = "no other fold passed to measure the float noise" if noise is None else (
            f"the folds that passed measure at most {noise:.3g} units (the float noise)"
        )
        eps = rounding_unit(check.dtype)
        units = (
            f"{check.units:.3g} rounding units root mean square over the channel ({check.dtype} eps {eps:.3g} x each "
            f"element's sqrt(sum (w x)^2 + c^2) over the terms summed, {check.magnitude:.3g} at the largest error)"
        )
        return (
            f"fold {check.fold}{others}: output channel {check.channel} of the folded layer, run on the original's "
            f"input to it, differs from the original by up to {check.max_abs_error:.3g}, {units}, over the "
            f"{check.allowed_units:g} allowed; {measured}; {self._acceptable(check.units * eps)}"
        )

    def _describe_parameter_failure(self, parameters: ParameterComparison) -> str:
        if parameters.reason:
            return parameters.reason
        noise = self.parameter_noise
        measured = "no other fold passed" if noise is None else f"the folds that passed are within {noise:.3g} units"
        eps = rounding_unit(parameters.dtype)
        scale = "|exact value|" if parameters.parameter == "weight" else "the size of the terms summed into it"
        return (
            f"the folded {parameters.parameter} of output channel {parameters.channel} is off the exact (float64) fold "
            f"of the original's parameters by up to {parameters.error:.3g}, {parameters.units:.3g} rounding units "
            f"({parameters.dtype} eps {eps:.3g} x {scale}, {parameters.magnitude:.3g} there), over the "
            f"{parameters.allowed_units:g} allowed (a correct fold rounds to within a few units); {measured}; "
            f"{self._acceptable(parameters.units * eps)}"
        )

    def _acceptable(self, rtol: float) -> str:
        if not math.isfinite(rtol):  # (NaN or Inf units: no tolerance accepts the difference)
            return f"no tolerance accepts that (or {self.overrides.skip})"
        return (
            f"if the difference is acceptable, rerun with {self.overrides.option('rtol', f'{rtol:.2g}')} or more "
            f"(or {self.overrides.skip})"
        )

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "outputs_compared": len(self.compared),
            "inputs": self.inputs,
            "outputs": [o.to_dict() for o in self.outputs],
            "folds": [c.to_dict() for c in self.folds],
        }

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        skipped = len(self.outputs) - len(self.compared)
        text = f"verification {verdict}: {len(self.outputs)} output(s)"
        if not self.compared:
            return f"{text}, {self.reason}"
        if skipped:
            text += f", {skipped} not compared"
        text += f", max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}"
        checked = [c for c in self.folds if c.status != "not compared"]
        if self.folds:
            # (said even when none is: a fold left to the outputs' check passes a one-channel error below rtol)
            text += f"; {len(checked)} of {len(self.folds)} fold(s) checked on their own"
            by_parameters = sum(c.units is None and c.parameters is not None for c in checked)
            if by_parameters:
                text += f" ({by_parameters} by their parameters alone)"
        measured = [c.units for c in checked if c.units is not None]
        if measured:
            text += f", worst {max(measured):.3g} rounding units"
        compared = [c.parameters.units for c in checked if c.parameters is not None]
        if compared:
            text += f", parameters within {max(compared):.3g} of the exact fold"
        if len(checked) < len(self.folds):
            first = next(c for c in self.folds if c.status == "not compared")
            text += f" (not {first.fold}: {first.reason})"
        return text


def compare_output(
    name: str,
    expected: np.ndarray,
    actual: np.ndarray,
    dtype_name: str,
    atol: float | None = None,
    rtol: float | None = None,
) -> OutputComparison:
    """Compare one output in float64 on the elements where the original is finite. Where it is NaN or
    Inf the folded output must hold the same (NaN, or the same infinity); NaN or Inf in the folded output
    where the original is finite fails. An output with no finite element is not compared."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.dtype.kind in _NOT_REAL_KINDS:
        return not_compared(name, dtype_name, f"its {expected.dtype} values are not real numbers", atol, rtol)
    atol, rtol = tolerances_for(dtype_name, atol, rtol)

    def result(status: Status, compared: int, max_abs: float | None, max_rel: float | None, reason: str = ""):
        return OutputComparison(name, dtype_name, status, expected.size, compared, max_abs, max_rel, atol, rtol, reason)

    if actual.dtype.kind in _NOT_REAL_KINDS or expected.shape != actual.shape:
        found = f"{actual.dtype} of shape {list(actual.shape)} where the original is {expected.dtype} of shape {list(expected.shape)}"
        return result("failed", 0, math.inf, math.inf, found)
    # A block at a time, in float64 (an output of 25M float32 elements took 1.5 GB in whole-array float64 steps).
    unlike = compared = introduced = 0
    magnitude = max_abs = 0.0
    for (_, want), (_, got) in zip(_blocks(expected), _blocks(actual)):
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        finite = np.isfinite(want64)
        unlike += int(np.count_nonzero(~finite & ~((want64 == got64) | (np.isnan(want64) & np.isnan(got64)))))
        reference, folded = want64[finite], got64[finite]
        if not reference.size:
            continue
        compared += reference.size
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(folded - reference)
        outside = ~np.isfinite(folded)  # NaN or Inf that the fold brought in
        introduced += int(np.count_nonzero(outside))
        diff[outside] = math.inf
        magnitude = max(magnitude, float(np.abs(reference).max()))
        max_abs = max(max_abs, float(diff.max()))
    if unlike:
        return result("failed", 0, math.inf, math.inf, f"{unlike} element(s) differ where the original is NaN or Inf")
    if compared == 0:
        why = "the output is empty" if expected.size == 0 else f"the original is NaN or Inf in all {expected.size} element(s)"
        return result("not compared", 0, None, None, why)
    max_rel = max_abs / magnitude if magnitude else (0.0 if max_abs == 0 else math.inf)
    allowed = atol + rtol * magnitude
    if introduced:
        comparison = result("failed", compared, max_abs, max_rel, f"NaN or Inf in {introduced} element(s) where the original is finite")
    elif max_abs > allowed:
        beyond = sum(_count_beyond(want, got, allowed) for (_, want), (_, got) in zip(_blocks(expected), _blocks(actual)))
        comparison = result("failed", compared, max_abs, max_rel, f"{beyond} of {compared} element(s) beyond atol {atol:g} + rtol {rtol:g} x max |original|")
    else:
        comparison = result("passed", compared, max_abs, max_rel)
    comparison.magnitude = magnitude
    return comparison


def _count_beyond(expected: np.ndarray, actual: np.ndarray, allowed: float) -> int:
    """How many elements of the block differ by more than ``allowed`` where ``expected`` is finite."""
    want64, got64 = expected.astype(np.float64), actual.astype(np.float64)
    finite = np.isfinite(want64)
    with np.errstate(invalid="ignore", over="ignore"):
        return int(np.count_nonzero(np.abs(got64[finite] - want64[finite]) > allowed))
