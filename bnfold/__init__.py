"""bnfold: fold eval-mode BatchNorm into neighbouring layers of ONNX and PyTorch models.

- ``bnfold.fold_onnx(model_or_path)`` -> ``(folded_model, FoldReport)``: the ONNX front-end.
- ``bnfold.fold(module, example_inputs)`` -> ``TorchFoldResult(model, report)``: the PyTorch front-end
  (imported on first use, so ONNX-only users do not pay for importing torch).
"""

from bnfold.fold_math import ChannelAffine, UnfoldableStatisticsError, WeightLayout, batchnorm_affine
from bnfold.onnx_fold import fold_onnx
from bnfold.report import Fold, FoldReport, Skip
from bnfold.verification import Verification, VerificationError

_TORCH_FRONTEND = ("fold", "TorchFoldResult", "ModelNotTraceableError")

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
    "batchnorm_affine",
    "fold",
    "fold_onnx",
]


def __getattr__(name: str):
    if name in _TORCH_FRONTEND:
        from bnfold import torch_fold

        return getattr(torch_fold, name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
