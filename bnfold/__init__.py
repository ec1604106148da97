"""bnfold: fold eval-mode BatchNorm into neighbouring layers of ONNX and PyTorch models.

- ``bnfold.fold_onnx(model_or_path)`` -> ``(folded_model, FoldReport)``: the ONNX front-end.
- ``bnfold.fold(module, example_inputs)`` -> ``TorchFoldResult(model, report)``: the PyTorch front-end.
- ``bnfold.check(model_or_path, example_inputs)`` -> findings; ``bnfold.assert_inference_ready(...)``.

The PyTorch front-end and the checks are imported on first use, so ONNX-only users do not pay for
importing torch.
"""

import importlib

from bnfold.fold_math import ChannelAffine, UnfoldableStatisticsError, WeightLayout, batchnorm_affine
from bnfold.onnx_fold import fold_onnx
from bnfold.report import Fold, FoldReport, Skip
from bnfold.verification import Verification, VerificationError

_LAZY = {
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
    "ModelNotTraceableError",
    "Skip",
    "TorchFoldResult",
    "UnfoldableStatisticsError",
    "Verification",
    "VerificationError",
    "WeightLayout",
    "assert_inference_ready",
    "batchnorm_affine",
    "check",
    "fold",
    "fold_onnx",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
