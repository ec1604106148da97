"""The Python entry points: :func:`check` returns the findings of any model kind, and
:func:`assert_inference_ready` fails a test when a model is not ready for inference.

    from bnfold import assert_inference_ready

    def test_model_ships_in_eval_mode():
        model = build_and_load_checkpoint()
        assert_inference_ready(model, torch.randn(2, 3, 224, 224))
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir

from bnfold.checks.findings import Finding, errors
from bnfold.checks.onnx_inspect import check_onnx
from bnfold.checks.sources import check_file

if TYPE_CHECKING:
    from torch import nn

    from bnfold.checks.torch_inspect import ExampleInputs, Model


def check(
    model: Model | onnx.ModelProto | ir.Model | str | os.PathLike,
    example_inputs: ExampleInputs | None = None,
    *,
    factory: Callable[[], nn.Module] | str | None = None,
    trust_pickle: bool = False,
) -> list[Finding]:
    """Every finding of ``model``: a PyTorch model, an ONNX model, or the path of a model file.

    ``factory`` builds the architecture a state-dict file is loaded into (a callable, or its
    ``"module:callable"`` name); ``trust_pickle=True`` allows loading files whose loading runs code."""
    if isinstance(model, (str, os.PathLike)):
        return check_file(model, example_inputs=example_inputs, factory=factory, trust_pickle=trust_pickle)
    if isinstance(model, (onnx.ModelProto, ir.Model)):
        return check_onnx(model)
    from bnfold.checks.torch_inspect import check_model  # a PyTorch model: torch is there

    return check_model(model, example_inputs)


def assert_inference_ready(
    model: Model | onnx.ModelProto | ir.Model | str | os.PathLike,
    example_inputs: ExampleInputs | None = None,
    **options,
) -> None:
    """Raise ``AssertionError`` listing every error finding of ``model`` (see :func:`check`, which takes
    the same ``options``). Warnings and info findings pass."""
    __tracebackhide__ = True  # pytest shows the caller's line, not this function's
    failing = errors(check(model, example_inputs, **options))
    if failing:
        listing = "\n".join(f"  {finding.code} {finding.describe()}" for finding in failing)
        raise AssertionError(f"model is not ready for inference, {len(failing)} error(s):\n{listing}")
