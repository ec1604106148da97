"""``bnfold check``: a CI gate that catches eval-mode mistakes before a model ships.

Forgetting ``model.eval()`` leaves BatchNorm normalising with the statistics of whatever else is in
the batch and Dropout dropping, so predictions change with the batch. The check reads ONNX files and
PyTorch models (``torch.export`` archives, TorchScript archives, state-dicts with a factory, or a
callable returning the model), reports findings with stable codes, and measures batch dependence by
running a batch of random samples and each sample alone.

======  ========  ==========================================================================
Code    Severity  Finding
======  ========  ==========================================================================
BN001   error     BatchNorm in training mode: ONNX ``training_mode=1``, ``is_test=0`` (opset < 7)
                  or running-statistics outputs declared/read; PyTorch ``module.training``, or
                  exported with ``training=True``
BN002   error     BatchNorm without running statistics (``track_running_stats=False``): always
                  batch statistics
BN003   error     running statistics never trained: mean exactly 0 and variance exactly 1 in
                  every channel (PyTorch's initial values; ``num_batches_tracked == 0`` alone is not),
                  or variance exactly 0 in every channel (buffers never filled in)
BN004   error     broken running statistics: NaN/Inf, negative variance, variance + eps <= 0
BN005   warning   near-zero variance with a large scale: ``|γ|/sqrt(var+eps) > 1e4`` in some
                  channel, a precision risk (most of all once folded into the weights)
BN006   info      foldable BatchNorm left in an ONNX model: ``bnfold`` would remove it
BN007   warning   the fold would make int8 or float16 lossy: per-tensor int8 of the folded layer loses
                  more than 12 dB (measured on the layer's weights for the BatchNorms the fold
                  removes; estimated from max/median ``|γ|/sqrt(var+eps)`` where it cannot be
                  planned: TorchScript, exported programs, no example inputs), or folded values
                  overflow float16 or put > 1% more of them below its normal range
DO001   error     Dropout active at inference: ONNX true constant ``training_mode`` input (opset
                  12+) or ``is_test=0`` (opset < 7); PyTorch Dropout module in training mode
DO002   error     outputs random at inference: the same batch run twice gives different outputs
                  (``F.dropout`` with its default ``training=True``, a noise layer, a random draw)
BD001   error     outputs depend on the batch: a sample's output in a batch of K differs from
                  its output alone beyond the dtype tolerance (figures: which output, how much)
BD002   info      batch dependence not measured (batch fixed at 1, no example inputs, the model
                  does not run on random inputs), and why
======  ========  ==========================================================================

Python API: :func:`check` (any model kind, also as ``bnfold.check``), :func:`check_model` (PyTorch),
:func:`check_onnx`, :func:`check_file` (by file), each returning a list of :class:`Finding`;
:func:`assert_inference_ready` (also ``bnfold.assert_inference_ready``) for test suites.
"""

import importlib

from bnfold.checks.findings import CODES, CodeSelection, Finding, Rule, UnknownCodeError, errors

# Imported on first use: the inspectors import torch, seconds that every `bnfold` command would
# otherwise pay at start-up, since the CLI registers `check` beside `fold`.
_INSPECTOR_MODULES = {
    "assert_inference_ready": "bnfold.checks.assertions",
    "check": "bnfold.checks.assertions",
    "check_file": "bnfold.checks.sources",
    "check_model": "bnfold.checks.torch_inspect",
    "check_onnx": "bnfold.checks.onnx_inspect",
}


def __getattr__(name: str):
    if name in _INSPECTOR_MODULES:
        return getattr(importlib.import_module(_INSPECTOR_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CODES",
    "CodeSelection",
    "Finding",
    "Rule",
    "UnknownCodeError",
    "assert_inference_ready",
    "check_file",
    "check_model",
    "check_onnx",
    "errors",
]
