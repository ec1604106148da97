"""Batch dependence, measured: does a sample's prediction change with the other samples in its batch?

A model in inference mode computes each sample on its own. The measurement runs a batch of K seeded
random samples, then each sample alone, and compares that sample's row of every output with the
dtype tolerances of :mod:`bnfold.verification`. The batch runs twice first: outputs that differ between
those runs come from a random op (``F.dropout``, whose ``training`` defaults to True, a noise layer) or state a
call changes, a DO002 finding instead of a batch dependence the samples alone would seem to show. When the
model's batch size is fixed at B > 1, "alone" is a batch of B copies of the sample: batch statistics of identical
samples are that sample's own.

Front-ends supply a :data:`Runner`: it runs the batch made of the given sample indices (``[0, 1, 2, 3]``
is the whole batch, ``[2]`` or ``[2, 2]`` is sample 2 alone) and returns every output, batch axis first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from bnfold.checks.findings import Finding
from bnfold.errors import describe_error
from bnfold.limits import memory_hint
from bnfold.verification import OutputComparison, compare_output


@dataclasses.dataclass(frozen=True)
class Output:
    values: np.ndarray  # float64 is fine: the tolerance comes from ``dtype``
    dtype: str  # the model's dtype name for this output, e.g. "float32"


Runner = Callable[[list[int]], dict[str, Output]]


class NotMeasurable(Exception):
    """Why batch dependence cannot be measured on this model; becomes a BD002 finding."""


def not_measured(reason: str) -> Finding:
    return Finding("BD002", "", f"batch dependence not measured: {reason}")


def measurement_sizes(batch_dims: list[int | None], batch_size: int) -> tuple[int, int]:
    """``(batch size, copies that stand for one sample alone)`` for inputs with these batch dimensions
    (None: free, an int: fixed; a scalar input counts as fixed at 1)."""
    distinct = set(batch_dims)
    if distinct == {None}:
        return batch_size, 1
    if len(distinct) == 1 and (fixed := next(iter(distinct))) > 1:
        return fixed, fixed
    sizes = ", ".join(sorted("free" if dim is None else str(dim) for dim in distinct))
    raise NotMeasurable(
        f"the inputs' batch dimension is fixed ({sizes}) in the model, so there is no batch of several samples to run; "
        "export the model with a batch axis that is not fixed (--input-shape cannot change a size the model fixes)"
    )


def measure_batch_dependence(run: Runner, batch_size: int, alone_size: int = 1) -> list[Finding]:
    """Findings for each output whose rows differ between the batch of ``batch_size`` and the samples
    alone (run as ``alone_size`` copies), or one BD002 finding saying why nothing could be measured."""
    try:
        batched = run(list(range(batch_size)))
    except Exception as error:  # whatever the runtime raises: the model cannot be measured on random data
        # (past --max-memory, the message names the limit)
        return [not_measured(memory_hint(f"the model does not run on a batch of {batch_size} random samples ({describe_error(error)})"))]
    per_sample = [name for name, output in batched.items() if output.values.ndim and output.values.shape[0] == batch_size]
    if not per_sample:
        return [not_measured(f"no output has the batch dimension ({batch_size}) first")]
    random = _random_outputs(run(list(range(batch_size))), batched)
    if random:
        return random
    worst: dict[str, tuple[int, OutputComparison]] = {}
    unmeasured: dict[str, str] = {}  # output -> why a sample of it could not be compared
    compared: set[str] = set()
    for index in range(batch_size):
        try:
            alone = run([index] * alone_size)
        except Exception as error:  # runs in a batch but not alone: that is batch dependence too
            return [
                Finding("BD001", "", f"sample {index} fails when run {_alone(alone_size)} ({describe_error(error)}) "
                                     f"but runs in a batch of {batch_size}")
            ]  # fmt: skip
        for name in per_sample:
            comparison = compare_output(name, alone[name].values[0], batched[name].values[index], batched[name].dtype)
            if comparison.status == "not compared":
                unmeasured.setdefault(name, comparison.reason)
                continue
            compared.add(name)
            if comparison.failed and (name not in worst or comparison.max_abs_error > worst[name][1].max_abs_error):
                worst[name] = (index, comparison)
    if not compared:  # every row of every output is NaN or Inf: nothing was measured
        reasons = "; ".join(f"output {name!r}: {reason}" for name, reason in unmeasured.items())
        return [not_measured(f"no output row has a finite value to compare ({reasons})")]
    return [_dependence_finding(index, comparison, batch_size, alone_size) for index, comparison in worst.values()]


def _random_outputs(again: dict[str, Output], batched: dict[str, Output]) -> list[Finding]:
    """DO002 for the outputs that differ between two runs of the same batch: something random is active, and a
    comparison with the samples alone would blame the batch for it."""
    findings = []
    for name, output in batched.items():
        comparison = compare_output(name, again[name].values, output.values, output.dtype)
        if comparison.failed:
            findings.append(Finding(
                "DO002",
                name,
                f"the same batch run twice gives outputs that differ by up to {comparison.max_abs_error:.3g} (max rel "
                f"{comparison.max_rel_error:.3g}; {comparison.dtype} tolerance atol {comparison.atol:g}, rtol "
                f"{comparison.rtol:g}): something in the forward is random at inference (an active dropout, a noise op) "
                "or changes state at each call, so batch dependence was not measured",
            ))  # fmt: skip
    return findings


def _alone(alone_size: int) -> str:
    return "alone" if alone_size == 1 else f"as a batch of {alone_size} copies of itself"


def _dependence_finding(index: int, comparison: OutputComparison, batch_size: int, alone_size: int) -> Finding:
    return Finding(
        "BD001",
        comparison.name,
        f"sample {index} in a batch of {batch_size} differs from the same sample run {_alone(alone_size)} by up to "
        f"{comparison.max_abs_error:.3g} (max rel {comparison.max_rel_error:.3g}; {comparison.dtype} tolerance "
        f"atol {comparison.atol:g}, rtol {comparison.rtol:g})",
    )
