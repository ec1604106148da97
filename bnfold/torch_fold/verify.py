"""Running a model on the example inputs and comparing every output tensor with the shared tolerances."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.torch_fold.conversion import to_numpy
from bnfold.verification import Verification, compare_output


def run_outputs(model: nn.Module, example_inputs: tuple) -> dict[str, torch.Tensor]:
    """The model's output tensors by their place in the (nested) output, e.g. ``output[1]['logits']``."""
    with torch.no_grad():
        return dict(_flatten(model(*example_inputs), "output"))


def compare_outputs(
    expected: dict[str, torch.Tensor],
    actual: dict[str, torch.Tensor],
    example_inputs: tuple,
    atol: float | None,
    rtol: float | None,
) -> Verification:
    comparisons = []
    for name, expected_tensor in expected.items():
        actual_tensor = actual.get(name)
        # A missing output compares as a shape mismatch, which fails.
        actual_array = np.empty(0) if actual_tensor is None else to_numpy(actual_tensor)
        dtype_name = str(expected_tensor.dtype).removeprefix("torch.")
        comparisons.append(compare_output(name, to_numpy(expected_tensor), actual_array, dtype_name, atol, rtol))
    inputs = {f"input{i}": list(x.shape) for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)}
    return Verification(comparisons, inputs)


def _flatten(value: Any, name: str):
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from _flatten(item, f"{name}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{name}[{key!r}]")
