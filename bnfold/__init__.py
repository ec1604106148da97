"""bnfold: fold eval-mode BatchNorm into neighbouring layers of ONNX and PyTorch models.

- ``bnfold.fold_onnx(model_or_path)`` -> ``(folded_model, FoldReport)``: the ONNX front-end;
  ``bnfold.save(folded_model, path)`` writes its result.
- ``bnfold.fold(module, example_inputs)`` -> ``TorchFoldResult(model, report)``: the PyTorch front-end.
- ``bnfold.check(model_or_path, example_inputs)`` -> findings; ``bnfold.assert_inference_ready(...)``.

Every name is imported on first use, so ONNX-only users do not pay for importing torch.
"""

import importlib

# Everything is imported on first use: `bnfold --help` and ONNX-only users pay for no numpy, onnx or torch
# import they do not need.
_LAZY = {
    "ChannelAffine": "bnfold.fold_math",
    "UnfoldableStatisticsError": "bnfold.fold_math",
    "WeightLayout": "bnfold.fold_math",
    "batchnorm_affine": "bnfold.fold_math",
    "fold_onnx": "bnfold.onnx_fold.folding",
    "Fold": "bnfold.report",
    "FoldReport": "bnfold.report",
    "Skip": "bnfold.report",
    "Verification": "bnfold.verification",
    "VerificationError": "bnfold.errors",
    "VerificationUnavailableError": "bnfold.errors",
    "InputError": "bnfold.errors",
    "MissingInputError": "bnfold.errors",
    "save": "bnfold.onnx_fold.io",
    "fold": "bnfold.torch_fold",
    "TorchFoldResult": "bnfold.torch_fold",
    "ModelNotTraceableError": "bnfold.torch_fold",
    "check": "bnfold.checks",
    "assert_inference_ready": "bnfold.checks",
}

__all__ = [
    "ChannelAffine",
    "Fold",
    "FoldReport",
    "InputError",
    "MissingInputError",
    "ModelNotTraceableError",
    "Skip",
    "TorchFoldResult",
    "UnfoldableStatisticsError",
    "Verification",
    "VerificationError",
    "VerificationUnavailableError",
    "WeightLayout",
    "assert_inference_ready",
    "batchnorm_affine",
    "check",
    "fold",
    "fold_onnx",
    "save",
]


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import version

        return version("bnfold")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
