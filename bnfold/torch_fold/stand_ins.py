"""Stand-ins for Conv and Linear layers in the trace check's run when none of its values are kept (``verify=False``).

The trace check (:func:`.tracing.trace_model`) proves the fx graph computes what the model computes by running both
on the example inputs. What makes them differ is Python that fx evaluated on a proxy (``isinstance``, a flag, a
shape): it changes which operations run and on what, never what a convolution computes from its input. So when the
run serves only as that proof, each Conv/Linear the graph calls as a module computes, in both runs alike, a cheap
function of its whole input with the shape, dtype and memory format of its output:

    (1 + z) * p,   z = <x, p> / sqrt(numel(x)),   p a fixed random pattern, rotated by an offset of each layer's own

Any change to the input's values or to their order changes ``z`` by about the change's root mean square, as it would
change a real layer's output; an unchanged input gives the same output in both runs. At ImageNet size this takes the
convolutions out of the check (ResNet-50 at 224x224: the trace and its check 223 ms -> 151, ``fold(..., verify=False)``
2.12-2.48x fx ``fuse``'s time -> 1.35-1.84x; see the README).

In a model with hooks, every layer keeps its forward (a hook may read or change the values). So does a call that a
stand-in would not make cheaper (fewer than four million multiply-adds) or cannot mirror (an input of another dtype
or device, a shape the layer rejects): the layer's own forward computes it, or raises, as in the model. When the
run with stand-ins does not prove the graph, the check runs again on the real layers (:func:`.tracing.trace_model`),
so a stand-in can cost time, never a fold.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def can_stand_in(layer: nn.Module) -> bool:
    """Whether a stand-in may replace the calls of ``layer``, a layer running torch's own forward: a Conv (not
    transposed: that forward takes an output size) or Linear with no ``forward`` set on the instance."""
    return (
        isinstance(layer, nn.Linear) or (isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed)
    ) and "forward" not in vars(layer)


@contextlib.contextmanager
def layers_stood_in(layers: Iterable[nn.Module]) -> Iterator[None]:
    """While inside: each of ``layers`` (see :func:`can_stand_in`) computes its stand-in instead of its forward."""
    layers = list(layers)
    try:
        for index, layer in enumerate(layers):
            # Each layer its own rotation of the pattern: two layers on one input give different outputs, as real ones do.
            layer.forward = functools.partial(_stand_in, layer, index * _ROTATION_STEP % _PERIOD)
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


# A stand-in costs about 0.1 ms however small its layer; a layer with fewer multiply-adds than this runs no slower.
_FEWEST_MULTIPLY_ADDS = 4_000_000
# The pattern p: normal random values repeating with a prime period (drawing them costs 6 ns each), so that a
# rearrangement of a tensor's elements meets other values of p unless it shifts them by a multiple of the period.
_PERIOD = 65521
_ROTATION_STEP = 4099


@functools.cache
def _pattern_twice(device: torch.device) -> torch.Tensor:
    """The pattern's period twice over, so that each rotation is a slice, on ``device``."""
    pattern = torch.randn(_PERIOD, generator=torch.Generator().manual_seed(0))
    return torch.cat((pattern, pattern)).to(device)


def _stand_in(layer: nn.Module, rotation: int, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
    shape = _output_shape(layer, input)
    outputs = None if shape is None else math.prod(shape)
    if outputs is None or outputs * layer.weight[0].numel() < _FEWEST_MULTIPLY_ADDS:
        return type(layer).forward(layer, input)
    pattern = _pattern_twice(input.device)[rotation : rotation + _PERIOD]
    flat = input.reshape(-1).to(torch.float32)
    whole, rest = divmod(flat.numel(), _PERIOD)
    z = (flat[: whole * _PERIOD].view(whole, _PERIOD) @ pattern).sum() + flat[whole * _PERIOD :] @ pattern[:rest]
    factor = 1 + z / math.sqrt(max(flat.numel(), 1))
    values = torch.empty(outputs, device=input.device)
    whole, rest = divmod(outputs, _PERIOD)
    torch.mul(pattern.expand(whole, _PERIOD), factor, out=values[: whole * _PERIOD].view(whole, _PERIOD))
    torch.mul(pattern[:rest], factor, out=values[whole * _PERIOD :])
    if len(shape) == layer.weight.dim() and (_channels_last(input) or _channels_last(layer.weight)):
        # A batched convolution gives a channels-last output for a channels-last input or weight.
        moved = (shape[0], *shape[2:], shape[1])
        return values.to(input.dtype).reshape(moved).movedim(-1, 1)
    return values.to(input.dtype).reshape(shape)


def _channels_last(tensor: torch.Tensor) -> bool:
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return tensor.dim() in formats and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=formats[tensor.dim()])


def _output_shape(layer: nn.Module, input: torch.Tensor) -> tuple[int, ...] | None:  # noqa: A002
    """The shape of ``layer``'s output for ``input``, or None where its own forward must answer (it may raise)."""
    weight = layer.weight
    if (
        type(input) is not torch.Tensor
        or input.dtype != weight.dtype
        or not input.is_floating_point()
        or input.device != weight.device
        or input.layout is not torch.strided
        or torch.is_autocast_enabled(input.device.type)  # (a layer's output dtype is autocast's there)
    ):
        return None
    if isinstance(layer, nn.Linear):
        if input.dim() == 0 or input.shape[-1] != layer.in_features:
            return None
        return (*input.shape[:-1], layer.out_features)
    spatial = len(layer.kernel_size)
    if input.dim() not in (spatial + 1, spatial + 2) or input.shape[-spatial - 1] != layer.in_channels:
        return None
    sizes = input.shape[-spatial:]
    if layer.padding == "same":
        out_sizes = tuple(sizes)
    else:
        padding = (0,) * spatial if layer.padding == "valid" else layer.padding
        out_sizes = tuple(
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(sizes, padding, layer.dilation, layer.kernel_size, layer.stride)
        )
    if min(out_sizes) < 1:
        return None
    if input.dim() == spatial + 1:  # unbatched
        return (layer.out_channels, *out_sizes)
    return (input.shape[0], layer.out_channels, *out_sizes)
