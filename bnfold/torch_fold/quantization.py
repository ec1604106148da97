"""The PyTorch front-end's quantization figures (:mod:`bnfold.quantization`), from the plan: each fold's
layer weight as the model holds it before the rewrite, and the folded weight and bias as the rewrite writes
them (the plan's values, rounded once to the layer's dtype)."""

from __future__ import annotations

from bnfold.half_precision_error import BatchNormParameters
from bnfold.quantization import LayerQuantization, measure_fold, named_channels
from bnfold.torch_fold.conversion import to_numpy, to_numpy_as_is
from bnfold.torch_fold.planning import PlannedFold


def measure_torch_folds(folds: list[PlannedFold], target_dtype: str | None) -> list[LayerQuantization]:
    """Call before the rewrite, which writes the folded values into the layers' own tensors."""
    measured = []
    for fold in folds:
        layer, batchnorm = fold.layer, fold.batchnorm
        weight, bias = fold.layer_values
        scale = fold.affine.scale
        parameters = None
        if batchnorm.per_channel is None:
            gamma, beta, mean, variance = (
                to_numpy(tensor) for tensor in (batchnorm.weight, batchnorm.bias, batchnorm.running_mean, batchnorm.running_var)
            )
            channels = named_channels(scale, gamma, mean, variance, batchnorm.eps)
            parameters = BatchNormParameters(gamma, beta, mean, variance, batchnorm.eps)
        else:  # x * scale + shift: no statistics behind the scale
            channels = named_channels(scale)
        measured.append(
            measure_fold(
                to_numpy_as_is(layer.weight),  # (measured in its own dtype)
                weight,
                layer.layout,
                channels,
                bias_before=to_numpy(layer.bias),
                bias_after=bias,
                target_dtype=target_dtype,
                batchnorm_parameters=parameters,
                batchnorm=batchnorm.name,
                layer=layer.name,
                direction=fold.direction,
            )
        )
    return measured
