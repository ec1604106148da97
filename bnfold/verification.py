"""Output comparison shared by the front-ends: dtype-based tolerances and the error figures."""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass
class OutputComparison:
    name: str
    dtype: str
    max_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    passed: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Verification:
    """How the folded model's outputs compare with the original's on the same inputs."""

    outputs: list[OutputComparison]
    inputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "inputs": self.inputs,
            "outputs": [o.to_dict() for o in self.outputs],
        }

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verification {verdict}: {len(self.outputs)} output(s), "
            f"max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}"
        )


def compare_output(
    name: str,
    expected: np.ndarray,
    actual: np.ndarray,
    dtype_name: str,
    atol: float | None = None,
    rtol: float | None = None,
) -> OutputComparison:
    """Compare one output in float64; NaNs must sit in the same places on both sides."""
    atol, rtol = tolerances_for(dtype_name, atol, rtol)
    expected64 = np.asarray(expected, dtype=np.float64)
    actual64 = np.asarray(actual, dtype=np.float64)
    if expected64.shape != actual64.shape:
        return OutputComparison(name, dtype_name, float("inf"), float("inf"), atol, rtol, False)
    same_nan = np.array_equal(np.isnan(expected64), np.isnan(actual64))
    both = ~np.isnan(expected64)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(actual64[both] - expected64[both])
        diff = np.where(actual64[both] == expected64[both], 0.0, diff)  # equal infinities
        rel = diff / np.maximum(np.abs(expected64[both]), np.finfo(np.float64).tiny)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    passed = same_nan and bool(np.all(diff <= atol + rtol * np.abs(expected64[both])))
    return OutputComparison(name, dtype_name, max_abs, max_rel, atol, rtol, passed)


class VerificationError(RuntimeError):
    """The folded model does not reproduce the original's outputs within tolerance."""

    def __init__(self, verification: Verification, report=None):
        worst = max(verification.outputs, key=lambda o: (not o.passed, o.max_abs_error))
        super().__init__(
            f"folded model differs from the original: output {worst.name!r} max abs error "
            f"{worst.max_abs_error:.3g}, max rel error {worst.max_rel_error:.3g} "
            f"(atol {worst.atol:g}, rtol {worst.rtol:g})"
        )
        self.verification = verification
        self.report = report
