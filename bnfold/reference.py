"""A reference training-mode BatchNorm with the semantics of ``torch.nn.BatchNorm1d/2d/3d``.

Used to train the test fixture models with code of our own rather than torch's fused kernel, while
staying a drop-in for it: each class is a subclass of its torch counterpart that replaces only ``forward``,
so isinstance checks, ``convert_sync_batchnorm``, bnfold's fold and ``bnfold check`` see a BatchNorm, and
constructor, parameter and buffer names, shapes, dtypes and ``state_dict`` loading are torch's.

Semantics (channels on axis 1, statistics over every other axis, ``n`` values per channel):

- Batch statistics are used in training mode, and in eval mode when there are no running buffers
  (``track_running_stats=False``): ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the
  *biased* batch variance ``var = sum((x - mean)**2) / n``.
- In training mode with tracking, ``num_batches_tracked`` is incremented and, without autograd,
  ``running = (1 - f) * running + f * batch`` for the mean and the *unbiased* variance
  (``var * n / (n - 1)``), with ``f = momentum``, or ``f = 1 / num_batches_tracked`` (a cumulative
  moving average) when ``momentum`` is None.
- Eval mode with running buffers normalises with them.
- A channel with a single value cannot be normalised in training: ``ValueError`` as in torch. An empty batch
  gives an empty output and leaves the running statistics as they were.

The training-mode gradients are the closed-form ones (:class:`_BatchNormTrainFunction`), not autograd
through the forward. Statistics and gradients are accumulated in float64 and rounded to the input
dtype, as torch's CPU kernel does (its accumulation type for float32 on CPU is double).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["REFERENCE_BATCHNORMS", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_ACC = torch.float64


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    """``v`` (one value per channel) shaped to broadcast against ``x`` along axis 1."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class _BatchNormTrainFunction(torch.autograd.Function):
    """Batch-statistics BatchNorm with closed-form gradients.

    ``apply(x, weight, bias, eps)`` returns ``(y, mean, var)``: the output in ``x.dtype`` and the
    batch mean and *biased* variance in float64 (not differentiable; the caller uses them for the
    running statistics). ``weight`` and ``bias`` may be None.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        dims = _reduce_dims(x)
        xa = x.to(_ACC)
        mean = xa.mean(dims)
        centred = xa - _channel_view(mean, x)
        # Two-pass variance: more accurate than E[x^2] - E[x]^2 when |mean| >> std.
        var = centred.square().mean(dims)
        invstd = torch.rsqrt(var + eps)
        xhat = centred * _channel_view(invstd, x)
        y = xhat
        if weight is not None:
            y = y * _channel_view(weight.to(_ACC), x)
        if bias is not None:
            y = y + _channel_view(bias.to(_ACC), x)
        # xhat (float64) serves both gradient formulas; keeping it avoids recomputing the centring.
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        # (never xhat itself, as float64 without weight and bias would return it: an in-place op on the output,
        # ReLU(inplace=True), would change what backward reads)
        return y.to(x.dtype, copy=y is xhat), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None):
        xhat, invstd, weight = ctx.saved_tensors
        dims = _reduce_dims(xhat)
        n = xhat.numel() // xhat.size(1)
        dya = dy.to(_ACC)
        sum_dy = dya.sum(dims)
        sum_dy_xhat = (dya * xhat).sum(dims)

        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # d/dx of (x - mean) * invstd, with mean and invstd depending on x:
            # (1/n) * gamma * invstd * (n * dy - sum(dy) - xhat * sum(dy * xhat)).
            gain = invstd if weight is None else invstd * weight.to(_ACC)
            grad_x = (
                _channel_view(gain / n, xhat)
                * (n * dya - _channel_view(sum_dy, xhat) - xhat * _channel_view(sum_dy_xhat, xhat))
            ).to(dy.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None


class _ReferenceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The reference forward. Construction, parameters and buffers, ``reset_*``, ``extra_repr``, input checks
    and state_dict loading (a checkpoint without ``num_batches_tracked`` loads as in torch) are torch's own."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        # As in torch, the buffers (not the flag) decide in eval mode, and the counter is advanced
        # before the batch is validated (so a rejected batch still counts, exactly like torch).
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update = self.training and self.track_running_stats and self.running_mean is not None
        factor = 0.0
        if update:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

        if not use_batch_stats:
            # Eval with running statistics: a fixed affine map, so autograd differentiates it fine.
            # Evaluated in float64 too, so that the weight gradient (a sum over N*L values) is
            # accumulated in float64 as torch's kernel does.
            scale = torch.rsqrt(self.running_var.to(_ACC) + self.eps)
            if self.weight is not None:
                scale = scale * self.weight.to(_ACC)
            y = (x.to(_ACC) - _channel_view(self.running_mean.to(_ACC), x)) * _channel_view(scale, x)
            if self.bias is not None:
                y = y + _channel_view(self.bias.to(_ACC), x)
            return y.to(x.dtype)

        if not x.numel():
            return x.clone()  # an empty batch: nothing to normalise, and no statistics to blend in (torch's too)
        if x.numel() // x.size(1) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        y, mean, var = _BatchNormTrainFunction.apply(x, self.weight, self.bias, self.eps)
        if update:
            with torch.no_grad():
                n = x.numel() // x.size(1)
                unbiased = var * (n / (n - 1))
                # Blend in float64 and round once, like torch's CPU update.
                for running, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
                    running.copy_(factor * batch + (1.0 - factor) * running.to(_ACC))
        return y


class BatchNorm1d(_ReferenceBatchNorm, nn.BatchNorm1d):
    """BatchNorm over (N, C) or (N, C, L) input: a ``torch.nn.BatchNorm1d`` with the reference forward."""


class BatchNorm2d(_ReferenceBatchNorm, nn.BatchNorm2d):
    """BatchNorm over (N, C, H, W) input: a ``torch.nn.BatchNorm2d`` with the reference forward."""


class BatchNorm3d(_ReferenceBatchNorm, nn.BatchNorm3d):
    """BatchNorm over (N, C, D, H, W) input: a ``torch.nn.BatchNorm3d`` with the reference forward."""


REFERENCE_BATCHNORMS = (BatchNorm1d, BatchNorm2d, BatchNorm3d)
