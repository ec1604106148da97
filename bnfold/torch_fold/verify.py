"""Running a model on the example inputs and comparing every output tensor with the shared tolerances."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from bnfold.torch_fold.conversion import to_numpy
from bnfold.verification import OutputComparison, Verification, compare_output, not_compared, tolerances_for


def run_outputs(model: nn.Module, example_inputs: tuple) -> dict[str, Any]:
    """The leaves of the model's (nested) output by their place in it, e.g. ``output[1]['logits']``:
    tensors, and whatever else the forward returned (None, numpy arrays, numbers), which is not compared."""
    with torch.no_grad():
        leaves, _ = pytree.tree_flatten_with_path(model(*example_inputs))
    return {f"output{pytree.keystr(path)}": leaf for path, leaf in leaves}


def compare_outputs(
    expected: dict[str, Any],
    actual: dict[str, Any],
    example_inputs: tuple,
    atol: float | None,
    rtol: float | None,
) -> Verification:
    comparisons = [_compare_leaf(name, leaf, actual.get(name), atol, rtol) for name, leaf in expected.items()]
    inputs = {f"input{i}": list(x.shape) for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)}
    if any(isinstance(leaf, torch.Tensor) for leaf in expected.values()):
        return Verification(comparisons, inputs)
    returned = ", ".join(f"{name} is {_kind(leaf)}" for name, leaf in expected.items()) or "an empty container"
    return Verification(comparisons, inputs, nothing_compared=f"the forward returned no tensors ({returned})")


def _compare_leaf(name: str, expected: Any, actual: Any, atol: float | None, rtol: float | None) -> OutputComparison:
    if not isinstance(expected, torch.Tensor):
        return not_compared(name, _kind(expected), f"the forward returned {_kind(expected)} here, not a tensor")
    dtype_name = str(expected.dtype).removeprefix("torch.")
    if not isinstance(actual, torch.Tensor):
        atol, rtol = tolerances_for(dtype_name, atol, rtol)
        reason = f"{_kind(actual)} in the folded model's output where the original returned a tensor"
        return OutputComparison(name, dtype_name, "failed", expected.numel(), 0, math.inf, math.inf, atol, rtol, reason)
    return compare_output(name, to_numpy(expected), to_numpy(actual), dtype_name, atol, rtol)


def _kind(leaf: Any) -> str:
    return "None" if leaf is None else type(leaf).__name__
