"""Running a model on the example inputs and comparing every output tensor with the shared tolerances."""

from __future__ import annotations

import collections
import copy
import itertools
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from bnfold.fold_math import exact_fold
from bnfold.torch_fold.conversion import to_numpy, to_numpy_as_is, to_numpy_float
from bnfold.torch_fold.passthrough import keeps_element_order, keeps_shape
from bnfold.torch_fold.planning import PlannedFold
from bnfold.torch_fold.tracing import ModelRun, has_torch_forward, module_input
from bnfold.verification import (
    FoldCheck,
    OutputComparison,
    Verification,
    check_fold,
    compare_output,
    compare_parameters,
    fold_not_checked,
    folds_proven,
    not_compared,
    tolerances_for,
)


def run_outputs(model: nn.Module, example_inputs: tuple) -> dict[str, Any]:
    """The leaves of the model's (nested) output by their place in it, e.g. ``output[1]['logits']``:
    tensors, and whatever else the forward returned (None, numpy arrays, numbers), which is not compared."""
    with torch.no_grad():
        return output_leaves(model(*example_inputs))


def output_leaves(output: Any) -> dict[str, Any]:
    """The leaves of a forward's (nested) output by their place in it (see :func:`run_outputs`)."""
    leaves, _ = pytree.tree_flatten_with_path(output)
    return {f"output{pytree.keystr(path)}": leaf for path, leaf in leaves}


def compare_outputs(
    expected: dict[str, Any],
    actual: dict[str, Any],
    example_inputs: tuple,
    atol: float | None,
    rtol: float | None,
) -> Verification:
    comparisons = [_compare_leaf(name, leaf, actual.get(name), atol, rtol) for name, leaf in expected.items()]
    inputs = {f"input{i}": list(x.shape) for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)}
    if any(isinstance(leaf, torch.Tensor) for leaf in expected.values()):
        return Verification(comparisons, inputs)
    returned = ", ".join(f"{name} is {_kind(leaf)}" for name, leaf in expected.items()) or "an empty container"
    return Verification(comparisons, inputs, nothing_compared=f"the forward returned no tensors ({returned})")


def measure_noise(
    original: nn.Module, example_inputs: tuple, expected: dict[str, Any], actual: dict[str, Any], verification: Verification, folds: int,
    allowances: bool,
) -> None:
    """Measure each failed output's noise (see OutputComparison.measure_noise): how far another run of the original
    is from its run (``expected``), the float noise a user can compare the error with, and within which an output
    passes when each of the ``folds`` passed its own check (``verification.folds``) and ``allowances`` (no tolerance
    the user set) holds. The other run is, for a float32 model, a float64 copy of it on float64 inputs: the result
    its float32 run approximates, however the kernels round (switching oneDNN off, the measure before, changes no
    rounding in a model of Linear layers: a noise of 0). For a model with float16 or bfloat16 weights it is a
    float32 copy of it on float32 inputs (its own rounding: with oneDNN off, CPU kernels in those dtypes round
    alike), and for a float64 model, or one that does not run in float64, the original without oneDNN (other
    convolution kernels, other rounding). ``original`` must not be folded yet (a fold would make its own
    allowance)."""
    failed = [comparison for comparison in verification.outputs if comparison.failed and comparison.magnitude is not None]
    if not failed:
        return
    dtypes = {tensor.dtype for tensor in itertools.chain(original.parameters(), original.buffers()) if tensor.is_floating_point()}
    half = next((dtype for dtype in dtypes if dtype in _HALF), None)
    other = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch warns about TF32 on Intel GPUs as the flags change)
        try:
            if half is not None:
                other = run_outputs(copy.deepcopy(original).float(), _widened(example_inputs, _HALF, torch.float32))
                # (float32 is to a half-precision run what float64 is to a float32 one: the result it approximates)
                noise_from, exact = f"the original run in float32 against in {str(half).removeprefix('torch.')}", True
            elif dtypes == {torch.float32}:
                other = run_outputs(copy.deepcopy(original).double(), _widened(example_inputs, (torch.float32,), torch.float64))
                noise_from, exact = "the original's float32 run against a float64 run of it", True
        except Exception:  # noqa: BLE001 - a model that does not run in another dtype: other kernels then
            other = None
        try:
            if other is None:
                with torch.backends.mkldnn.flags(enabled=False):
                    other = run_outputs(original, example_inputs)
                noise_from, exact = "the original run without oneDNN against with it", False
        except Exception:  # noqa: BLE001 - the figure is a help to the reader, never a reason to fail differently
            return
    proven = folds_proven(verification.folds, folds)
    for comparison in failed:
        leaves = [leaves.get(comparison.name) for leaves in (expected, other, actual)]
        if all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            comparison.measure_noise(*(to_numpy(leaf) for leaf in leaves), noise_from, proven, allowances, exact)


def _widened(example_inputs: tuple, dtypes: tuple[torch.dtype, ...], wider: torch.dtype) -> tuple:
    """``example_inputs`` with each tensor of one of ``dtypes`` cast to ``wider`` (exactly)."""
    return tuple(x.to(wider) if isinstance(x, torch.Tensor) and x.dtype in dtypes else x for x in example_inputs)


def _compare_leaf(name: str, expected: Any, actual: Any, atol: float | None, rtol: float | None) -> OutputComparison:
    if not isinstance(expected, torch.Tensor):
        return not_compared(name, _kind(expected), f"the forward returned {_kind(expected)} here, not a tensor")
    dtype_name = str(expected.dtype).removeprefix("torch.")
    if not isinstance(actual, torch.Tensor):
        atol, rtol = tolerances_for(dtype_name, atol, rtol)
        reason = f"{_kind(actual)} in the folded model's output where the original returned a tensor"
        return OutputComparison(name, dtype_name, "failed", expected.numel(), 0, math.inf, math.inf, atol, rtol, reason)
    return compare_output(name, to_numpy(expected), to_numpy(actual), dtype_name, atol, rtol)


def _kind(leaf: Any) -> str:
    return "None" if leaf is None else type(leaf).__name__


class FoldCapture:
    """The original model's own values around each fold both of whose ends are modules called once:
    the layer's input and output and the BatchNorm's input and output, caught by forward hooks while the
    original runs for the output comparison, or taken from ``run``, the run of the model (before any fold) that
    proved its fx graph, when it recorded every module checked here (then nothing is hooked)."""

    def __init__(self, model: nn.Module, folds: list[PlannedFold], folds_into_model: bool, run: ModelRun | None = None):
        layers = collections.Counter(fold.layer.module_path for fold in folds)
        self.checked = [fold for fold in folds if fold.in_module_tree and layers[fold.layer.module_path] == 1 and _values_line_up(fold)]
        self.values: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # Half-precision layers are checked in float32 (see LOCAL_UNITS): a float32 copy of each, taken
        # before folding changes it (an in-place fold folds this very model).
        self.originals = {
            fold: copy.deepcopy(model.get_submodule(fold.layer.module_path)).float()
            for fold in self.checked
            if fold.layer.weight.dtype in _HALF
        }
        # Each checked layer's original weight and bias, for the parameter check: copies when the fold writes
        # into this very model (inplace=True), else the untouched original's own tensors.
        self.parameters = {
            fold: _parameters(model.get_submodule(fold.layer.module_path), folds_into_model) for fold in self.checked
        }
        # Each BatchNorm module the fold replaces by its children (the object: an in-place fold unregisters it).
        self.replaced = {fold: model.get_submodule(fold.batchnorm.module_path) for fold in self.checked if fold.batchnorm.kept_children}
        self._hooks = []
        paths = {path for fold in self.checked for path in (fold.layer.module_path, fold.batchnorm.module_path)}
        self.recorded = run is not None and paths <= run.calls.keys()
        if self.recorded:
            self.values = {path: run.calls[path] for path in paths}
            return
        for path in paths:
            self._hooks.append(model.get_submodule(path).register_forward_hook(self._recorder(path), with_kwargs=True))

    def _recorder(self, path: str):
        def record(module, args, kwargs, output):
            data = module_input(args, kwargs)
            if isinstance(data, torch.Tensor) and isinstance(output, torch.Tensor):
                # Copies: a later in-place op (ReLU(inplace=True), ``out += identity``) would change them.
                self.values.setdefault(path, []).append((data.detach().clone(), output.detach().clone()))

        return record

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def check(self, folded: nn.Module, folds: list[PlannedFold], rtol: float | None) -> list[FoldCheck]:
        checks = []
        for fold in folds:
            label = fold.to_report().describe()
            if fold not in self.checked:
                if not fold.in_module_tree:
                    why = "a function call in the traced graph"
                elif not _values_line_up(fold):
                    why = "the calls between the layer and the BatchNorm rearrange the values"
                else:
                    why = "the layer absorbs more than one fold"
                checks.append(fold_not_checked(label, f"{why}: checked through the model's outputs only"))
                continue
            layer_calls = self.values.get(fold.layer.module_path, [])
            norm_calls = self.values.get(fold.batchnorm.module_path, [])
            if len(layer_calls) != 1 or len(norm_calls) != 1:
                checks.append(fold_not_checked(label, "the layer or BatchNorm runs more than once: checked through the model's outputs only"))
                continue
            checks.append(_check_one(
                fold, folded, layer_calls[0], norm_calls[0], label, rtol, self.originals.get(fold), self.parameters[fold], self.replaced.get(fold),
            ))  # fmt: skip
        return checks


_HALF = (torch.float16, torch.bfloat16)

def _values_line_up(fold: PlannedFold) -> bool:
    """Whether the values caught around the BatchNorm line up with the layer's: the BatchNorm's output reshaped
    is the layer's output (into the preceding layer), or the BatchNorm's input is the layer's (following)."""
    if fold.direction == "into-preceding":
        return all(keeps_element_order(node) for node in fold.between)
    return all(keeps_shape(node) for node in fold.between)


def _parameters(layer: nn.Module, copy_them: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    return (weight.clone(), None if bias is None else bias.clone()) if copy_them else (weight, bias)


def _squared_call(layer: nn.Module, squared_data: torch.Tensor, bias_terms: np.ndarray) -> torch.Tensor:
    """The layer with its weight squared and, for its bias, the square of the terms summed into it
    (``bias_terms``, see ExactFold), on ``squared_data``: sum (w x)^2 + c^2 per output element. A torch Conv's or
    Linear's own computation on the squared tensors, else its forward through functional_call (the layer's
    parameters stay as they are)."""
    squared = {name: parameter.square() for name, parameter in layer.named_parameters() if name != "bias"}
    if "weight" not in squared:  # (a weight held as a buffer: frozen weights)
        squared["weight"] = layer.weight.square()
    squared["bias"] = torch.from_numpy(np.square(bias_terms)).to(layer.weight.device, layer.weight.dtype)
    if isinstance(layer, nn.Linear) and has_torch_forward(layer):
        return F.linear(squared_data, squared["weight"], squared["bias"])
    if isinstance(layer, nn.modules.conv._ConvNd) and has_torch_forward(layer):
        if not layer.transposed:
            return layer._conv_forward(squared_data, squared["weight"], squared["bias"])
        if layer.padding_mode == "zeros":  # (what torch's forward accepts; else it raises, through functional_call)
            # torch's ConvTranspose forward without an output_size, on the squared tensors (a third of
            # functional_call's time, which swaps every parameter of the module in and out).
            spatial = len(layer.kernel_size)
            output_padding = layer._output_padding(squared_data, None, layer.stride, layer.padding, layer.kernel_size, spatial, layer.dilation)
            return _CONV_TRANSPOSE[spatial](
                squared_data, squared["weight"], squared["bias"], layer.stride, layer.padding, output_padding, layer.groups, layer.dilation
            )
    return functional_call(layer, squared, (squared_data,))


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _children_replaced_wrongly(
    fold: PlannedFold, folded: nn.Module, module: nn.Module, norm_in: torch.Tensor, norm_out: torch.Tensor
) -> str | None:
    """Why the children the folded BatchNorm ``module`` was replaced by (timm's BatchNormAct2d: drop, act) do not
    compute what the module computed, from its normalisation of its input; None when they do. The fold's own check
    compares the layer before them: this one proves the replacement, on the module's input in the original's run, and
    on that input halved and doubled along its last axis (the batch for a BatchNorm1d's [N, C]): a graph torch.export
    captured holds the branches the example's shapes took (``if x.shape[-1] > 8: y = self.act(y)``)."""
    batchnorm = fold.batchnorm
    children = [folded.get_submodule(f"{batchnorm.module_path}.{name}") for name in batchnorm.kept_children]
    axis = -1 if norm_in.dim() > 2 else 0
    size = norm_in.shape[axis]
    variants = [(norm_in, norm_out)]
    with torch.no_grad():
        for other in (norm_in.narrow(axis, 0, size // 2) if size > 1 else None, torch.cat((norm_in, norm_in.flip(axis)), axis)):
            if other is not None:
                variants.append((other, module(other)))
        for data, expected in variants:
            value = _normalised(batchnorm, data)
            for child in children:
                value = child(value)
            if not isinstance(value, torch.Tensor) or not isinstance(expected, torch.Tensor) or value.shape != expected.shape:
                return f"`{batchnorm.module_path}` replaced by its {', '.join(batchnorm.kept_children)} gives another shape than the module"
            if torch.equal(value, expected):
                continue  # (the usual case: the same calls on the same values)
            comparison = compare_output("output", to_numpy(expected), to_numpy(value), str(expected.dtype).removeprefix("torch."))
            if not comparison.passed:
                shape = "" if data is norm_in else f" on its input reshaped to {list(data.shape)}"
                return (
                    f"`{batchnorm.module_path}` replaced by its {', '.join(batchnorm.kept_children)} does not compute what "
                    f"the module computes{shape}: {comparison.describe_failure()}"
                )
    return None


def _normalised(batchnorm, data: torch.Tensor) -> torch.Tensor:
    """The BatchNorm's normalisation of ``data``, as its call computed it (``F.batch_norm``, or ``x * scale + shift``)."""
    if batchnorm.per_channel is None:
        return F.batch_norm(data, batchnorm.running_mean, batchnorm.running_var, batchnorm.weight, batchnorm.bias, False, 0.0, batchnorm.eps)
    shape = [-1] + [1] * (data.dim() - 2)
    scale, shift = (tensor.to(data.dtype).reshape(shape) for tensor in batchnorm.per_channel)
    return data * scale + shift


def _check_one(
    fold: PlannedFold, folded: nn.Module, layer_call, norm_call, label: str, rtol: float | None, original, parameters,
    replaced: nn.Module | None = None,
) -> FoldCheck:
    """The folded layer on the original's input to it against the original layer and BatchNorm, each element's
    error in units of its rounding scale sqrt(sum (w x)^2 + c^2), c the terms summed into the bias (see
    LOCAL_UNITS), and its parameters against the exact fold of the original's (see PARAMETER_UNITS)."""
    (layer_in, _), (norm_in, norm_out) = layer_call, norm_call
    if replaced is not None:
        wrong = _children_replaced_wrongly(fold, folded, replaced, norm_in, norm_out)
        if wrong is not None:
            return FoldCheck(label, str(norm_out.dtype).removeprefix("torch."), "failed", reason=wrong)
    axis = fold.layer.feature_axis(layer_call[1].dim())
    folded_layer = layer = folded.get_submodule(fold.layer.module_path)
    preceding = fold.direction == "into-preceding"
    data = layer_in if preceding else norm_in
    dtype_name = str(data.dtype).removeprefix("torch.")
    affine = fold.affine
    exact = exact_fold(*(to_numpy_float(tensor) for tensor in parameters), affine, fold.layer.layout, preceding)
    with torch.no_grad():
        if original is None and fold.batchnorm.kept_children and preceding:
            # A BatchNorm module that applies children after normalising (timm's BatchNormAct2d: drop, act) shows
            # no normalised value: the exact per-channel map of the original layer's output stands for it. (Into
            # the layer after it, the children pass the values: the layer's own output is the reference.)
            layer_out = layer_call[1].double()
            shape = [-1] + [1] * (layer_out.dim() - 1 - axis)
            scale, shift = (torch.from_numpy(array).to(layer_out.device).reshape(shape) for array in (affine.scale, affine.shift))
            reference = layer_out * scale + shift
        elif original is None:
            reference = norm_out if preceding else layer_call[1]
            if fold.channels is not None:  # (after a concatenation: the layer's part of the BatchNorm's channels)
                reference = reference.narrow(1, fold.channels[0], fold.channels[1] - fold.channels[0])
            reference = reference.reshape(layer_call[1].shape)  # LeViT's LinearNorm: BatchNorm1d on flatten(0, 1)
        else:
            # Half precision: both sides in float32 from the exactly upcast input and weights.
            data = data.float()
            shape = [-1] + [1] * (data.dim() - 1 - axis)
            scale, shift = (torch.from_numpy(array).to(data.device, torch.float32).reshape(shape) for array in (affine.scale, affine.shift))
            reference = original(data) * scale + shift if preceding else original(data * scale + shift)
            layer = copy.deepcopy(layer).float()
        actual = layer(data)
        magnitude = _squared_call(layer, data * data, exact.bias_terms).sqrt()
    bias = None if folded_layer.bias is None else to_numpy_as_is(folded_layer.bias)
    compared = compare_parameters(exact, to_numpy_as_is(folded_layer.weight), bias, fold.layer.layout, rtol)
    # The comparison works in float64 from values of any float dtype numpy has.
    reference, actual, magnitude = (to_numpy_float(tensor) for tensor in (reference, actual, magnitude))
    return check_fold(label, dtype_name, reference, actual, magnitude, axis, rtol, compared)
