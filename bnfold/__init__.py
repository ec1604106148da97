"""bnfold: fold eval-mode BatchNorm into neighbouring layers of ONNX and PyTorch models."""

from bnfold.onnx_fold import fold_onnx
from bnfold.fold_math import ChannelAffine, UnfoldableStatisticsError, WeightLayout, batchnorm_affine
from bnfold.report import Fold, FoldReport, Skip
from bnfold.verification import Verification, VerificationError

__all__ = [
    "ChannelAffine",
    "Fold",
    "FoldReport",
    "Skip",
    "UnfoldableStatisticsError",
    "Verification",
    "VerificationError",
    "WeightLayout",
    "batchnorm_affine",
    "fold_onnx",
]
