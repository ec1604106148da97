"""An assertion for test suites: fail a test when a model is not ready for inference.

    from bnfold.check import assert_inference_ready

    def test_model_ships_in_eval_mode():
        model = build_and_load_checkpoint()
        assert_inference_ready(model, torch.randn(2, 3, 224, 224))
"""

from __future__ import annotations

import os

import onnx
import onnx_ir as ir

from bnfold.check.sources import check_file
from bnfold.check.findings import errors
from bnfold.check.onnx_inspect import check_onnx
from bnfold.check.torch_inspect import ExampleInputs, Model, check_model


def assert_inference_ready(
    model: Model | onnx.ModelProto | ir.Model | str | os.PathLike, example_inputs: ExampleInputs | None = None
) -> None:
    """Raise ``AssertionError`` listing every error finding of ``model``: a PyTorch model, an ONNX model,
    or the path of a model file. Warnings and info findings pass."""
    if isinstance(model, (str, os.PathLike)):
        findings = check_file(model, example_inputs=example_inputs)
    elif isinstance(model, (onnx.ModelProto, ir.Model)):
        findings = check_onnx(model)
    else:
        findings = check_model(model, example_inputs)
    failing = errors(findings)
    if failing:
        listing = "\n".join(f"  {finding.code} {finding.describe()}" for finding in failing)
        raise AssertionError(f"model is not ready for inference, {len(failing)} error(s):\n{listing}")
