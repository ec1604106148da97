"""Output comparison shared by the front-ends: dtype-based tolerances and the error figures."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

# (atol, rtol) per output dtype; an element passes when |folded - original| <= atol + rtol * |original|.
# Folding reorders one multiply per weight, so the errors are a few ulps per layer, accumulated over depth.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (6e-2, 6e-2),
}


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


@dataclasses.dataclass
class OutputComparison:
    """One output. Errors are over the ``elements_compared`` elements (None when there are none);
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

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


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

    @property
    def compared(self) -> list[OutputComparison]:
        return [output for output in self.outputs if output.status != "not compared"]

    @property
    def passed(self) -> bool:
        compared = self.compared
        return bool(compared) and all(output.passed for output in compared)

    @property
    def max_abs_error(self) -> float | None:
        return max((o.max_abs_error for o in self.compared), default=None)

    @property
    def max_rel_error(self) -> float | None:
        return max((o.max_rel_error for o in self.compared), default=None)

    @property
    def reason(self) -> str:
        """Why the verification failed ("" when it passed): the worst failing output, or why nothing was compared."""
        failed = [output for output in self.outputs if output.failed]
        if failed:
            worst = max(failed, key=lambda o: o.max_abs_error)
            return (
                f"folded model differs from the original: output {worst.name!r}, max abs error "
                f"{worst.max_abs_error:.3g}, max rel error {worst.max_rel_error:.3g}: {worst.reason}"
            )
        if self.compared:
            return ""
        why = self.nothing_compared or "; ".join(f"output {o.name!r}: {o.reason}" for o in self.outputs)
        return f"nothing was compared: {why or 'the model has no outputs'}"

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "outputs_compared": len(self.compared),
            "inputs": self.inputs,
            "outputs": [o.to_dict() for o in self.outputs],
        }

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        skipped = len(self.outputs) - len(self.compared)
        text = f"verification {verdict}: {len(self.outputs)} output(s)"
        if not self.compared:
            return f"{text}, {self.reason}"
        if skipped:
            text += f", {skipped} not compared"
        return f"{text}, max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}"


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
    expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
    finite = np.isfinite(expected64)
    unlike = ~finite & ~((expected64 == actual64) | (np.isnan(expected64) & np.isnan(actual64)))
    if unlike.any():
        return result("failed", 0, math.inf, math.inf, f"{int(unlike.sum())} element(s) differ where the original is NaN or Inf")
    compared = int(finite.sum())
    if compared == 0:
        why = "the output is empty" if expected.size == 0 else f"the original is NaN or Inf in all {expected.size} element(s)"
        return result("not compared", 0, None, None, why)
    reference, folded = expected64[finite], actual64[finite]
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(folded - reference)
        diff[~np.isfinite(folded)] = math.inf  # NaN or Inf that the fold brought in
        rel = diff / np.maximum(np.abs(reference), np.finfo(np.float64).tiny)
    max_abs, max_rel = float(diff.max()), float(rel.max())
    introduced = int(np.count_nonzero(~np.isfinite(folded)))
    if introduced:
        return result("failed", compared, max_abs, max_rel, f"NaN or Inf in {introduced} element(s) where the original is finite")
    beyond = int(np.count_nonzero(diff > atol + rtol * np.abs(reference)))
    if beyond:
        beyond_text = f"{beyond} of {compared} element(s) beyond atol {atol:g} + rtol {rtol:g} x |original|"
        return result("failed", compared, max_abs, max_rel, beyond_text)
    return result("passed", compared, max_abs, max_rel)


class VerificationError(RuntimeError):
    """The folded model does not reproduce the original's outputs within tolerance, or nothing could be compared."""

    def __init__(self, verification: Verification, report=None):
        super().__init__(verification.reason)
        self.verification = verification
        self.report = report
