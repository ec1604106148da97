"""Calls that may sit between a layer and its BatchNorm because their output holds their input's values:
which they are, and where they move the channel axis.

Two kinds: calls that keep the values where they are (``nn.Identity``, eval-mode Dropout modules, dropout
functions called with ``training=False``), and rearrangements (``flatten``/``view``/``reshape``/``squeeze``/
``unsqueeze``/``clone``, ``nn.Flatten``/``nn.Unflatten`` modules, ``.to()``/``.float()`` and the like where the
dtype stays, ``permute``/``transpose``/``swapdims``/``movedim``, as fx and torch.export record them). A
BatchNorm scales and shifts each element by its channel, so it moves across a rearrangement when the channel axis
stays one whole axis:
LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(x)`` normalises the Linear's output features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnfold.torch_fold.tracing import SHAPE_AND_DTYPE, TracedModel, computes_torch_forward, has_hooks

aten = torch.ops.aten

# Conversions: which dtype, device or memory format comes out. Only those that keep the dtype pass values.
_CONVERSIONS = frozenset({"to", "float", "double", "half", "bfloat16", aten._to_copy.default})
# Each takes its data as the first argument; the others only say which shape comes out.
_RESHAPES = _CONVERSIONS | frozenset({
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "contiguous", "clone",
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten, torch.clone,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.view_as.default,
    aten.reshape_as.default, aten.contiguous.default, aten.clone.default,
})
# Modules whose forward is a reshape of their input.
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
# These read only the shape of their second argument.
SHAPED_LIKE = frozenset({"view_as", "reshape_as", aten.view_as.default, aten.reshape_as.default})
_PERMUTES = frozenset({"permute", torch.permute, aten.permute.default})
_TRANSPOSES = frozenset({
    "transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims,
    aten.transpose.int, aten.swapaxes.default, aten.swapdims.default,
})
# Their axes' keywords: transpose's and swapdims', swapaxes'.
_SWAPPED_AXES_KEYWORDS = ("dim0", "dim1", "axis0", "axis1")
# (input, source, destination), each an axis or a sequence of axes.
_MOVEDIMS = frozenset({
    "movedim", "moveaxis", torch.movedim, torch.moveaxis,
    aten.movedim.int, aten.movedim.intlist, aten.moveaxis.int, aten.moveaxis.intlist,
})
# Dropout functions: (input, p, training, ...), `train` in aten's.
_DROPOUTS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default, aten.feature_alpha_dropout.default,
})


def held_by_hooks(node: Any, traced: TracedModel) -> bool:
    """Whether ``node`` is a call of a module that would pass values (see :func:`passes_values`) but for its hooks."""
    return (
        isinstance(node, fx.Node) and node.op == "call_module" and _keeps_values(node, traced) and has_hooks(traced.module(node.target))
    )


def _keeps_values(node: fx.Node, traced: TracedModel) -> bool:
    """A module call of ``nn.Identity``, an eval-mode Dropout, ``nn.Flatten`` or ``nn.Unflatten`` on its data alone."""
    module = traced.module(node.target)
    keeps = isinstance(module, (nn.Identity, *_RESHAPE_MODULES)) or (isinstance(module, nn.modules.dropout._DropoutNd) and not module.training)
    return keeps and len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs and computes_torch_forward(module)


def passes_values(node: Any, traced: TracedModel) -> bool:
    """Whether ``node``'s output holds its data input's values (``node.args[0]``), rearranged at most: it is
    then no reader that must keep seeing un-normalised values."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return _keeps_values(node, traced) and not has_hooks(traced.module(node.target))
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in _DROPOUTS:
        return _dropout_is_off(node)
    if node.target not in _RESHAPES | _PERMUTES | _TRANSPOSES | _MOVEDIMS:
        return False
    # `x.view(torch.int32)` reinterprets the bits and `x.to(torch.float16)` rounds them: a rearrangement keeps the dtype.
    before, after = tensor_shape_and_dtype(node.args[0]), tensor_shape_and_dtype(node)
    return before is not None and after is not None and before[1] == after[1] and _data_only_first(node)


def converted_dtypes(node: Any) -> tuple[torch.dtype, torch.dtype] | None:
    """``(from, to)`` when ``node`` is a conversion that changes its data's dtype (``x.to(torch.float16)``)."""
    if not isinstance(node, fx.Node) or node.op == "call_module" or node.target not in _CONVERSIONS or not node.args:
        return None
    before, after = tensor_shape_and_dtype(node.args[0]), tensor_shape_and_dtype(node)
    return (before[1], after[1]) if before is not None and after is not None and before[1] != after[1] else None


def keeps_element_order(node: fx.Node) -> bool:
    """Whether the output lists the input's elements in the same order (a reshape, or no change at all)."""
    return node.op == "call_module" or node.target not in _PERMUTES | _TRANSPOSES | _MOVEDIMS


def keeps_shape(node: fx.Node) -> bool:
    """Whether the output is the input as it was (Identity, an eval-mode dropout), not rearranged."""
    if node.op == "call_module":  # (nn.Flatten and nn.Unflatten reshape: known by the shapes the graph run saw)
        return value_shape(node) == value_shape(node.args[0])
    return node.target in _DROPOUTS


def axis_after(node: fx.Node, axis: int) -> int | None:
    """Where axis ``axis`` of a pass-through's data input is in its output; None when it does not stay one
    whole axis there, or the shapes that would prove it are unknown."""
    if node.target in _DROPOUTS:
        return axis
    input_shape, output_shape = value_shape(node.args[0]), value_shape(node)
    if input_shape is None or output_shape is None:
        return None
    if node.op == "call_module":  # (its target is the module's path, whatever its name)
        return _reshaped_axis(tuple(input_shape), tuple(output_shape), axis)
    if node.target in _PERMUTES:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        dims = [dim % len(input_shape) for dim in node.kwargs.get("dims", dims)]
        return dims.index(axis) if axis in dims else None
    if node.target in _TRANSPOSES:
        first, second = (dim % len(input_shape) for dim in _swapped_axes(node))
        return {first: second, second: first}.get(axis, axis)
    if node.target in _MOVEDIMS:
        return _moved_axes(node, len(input_shape)).index(axis)
    return _reshaped_axis(tuple(input_shape), tuple(output_shape), axis)


def _swapped_axes(node: fx.Node) -> list[int]:
    """The two axes a transpose swaps, given by position or by keyword (``torch.transpose(x, dim0=1, dim1=2)``)."""
    return [*node.args[1:3], *(node.kwargs[name] for name in _SWAPPED_AXES_KEYWORDS if name in node.kwargs)]


def _moved_axes(node: fx.Node, rank: int) -> list[int]:
    """The input axis at each axis of a movedim's output: each source axis at its destination, the others in
    their order in the free places."""
    source, destination = [*node.args[1:3], *(node.kwargs[name] for name in ("source", "destination") if name in node.kwargs)]
    sources, destinations = ([axes] if isinstance(axes, int) else list(axes) for axes in (source, destination))
    moved = {to % rank: from_ % rank for from_, to in zip(sources, destinations)}
    others = iter(axis for axis in range(rank) if axis not in moved.values())
    return [moved[axis] if axis in moved else next(others) for axis in range(rank)]


def _reshaped_axis(input_shape: tuple[int, ...], output_shape: tuple[int, ...], axis: int) -> int | None:
    """A row-major reshape keeps an axis whole when an output axis has its size and the same number of elements
    after it: an element's index along both is then its flat index // that number, modulo the size. Only an axis
    of size 1 can have more than one such axis (next to other axes of size 1, as a batch of one), each as good as
    the other: the one at the same place, when it is one of them."""
    size, inner = input_shape[axis], math.prod(input_shape[axis + 1:])
    kept = [
        output_axis
        for output_axis, output_size in enumerate(output_shape)
        if output_size == size and math.prod(output_shape[output_axis + 1:]) == inner
    ]
    return axis if axis in kept else next(iter(kept), None)


def _dropout_is_off(node: fx.Node) -> bool:
    keyword = "train" if isinstance(node.target, torch._ops.OpOverload) else "training"
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get(keyword, True)
    return training is False


def _data_only_first(node: fx.Node) -> bool:
    """No argument but the first is a tensor the call reads (sizes may be computed values)."""
    others = [argument for argument in node.all_input_nodes if argument is not node.args[0]]
    return node.target in SHAPED_LIKE or all(value_shape(argument) is None for argument in others)


def value_shape(node: Any) -> tuple[int, ...] | None:
    """A node's tensor shape: recorded running the fx graph (:mod:`.tracing`), or the fake value export and
    Dynamo record."""
    shape_and_dtype = tensor_shape_and_dtype(node)
    return None if shape_and_dtype is None else shape_and_dtype[0]


def tensor_shape_and_dtype(node: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    if not isinstance(node, fx.Node):
        return None
    if SHAPE_AND_DTYPE in node.meta:
        return node.meta[SHAPE_AND_DTYPE]
    value = node.meta.get("val", node.meta.get("example_value"))  # export's, Dynamo's
    return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None
