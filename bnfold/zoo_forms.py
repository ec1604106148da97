"""Models in the forms that exporters and toolchains other than torch's leave behind (issue 15), for the
tests and the folder benchmark (``benchmarks/compare_folders.py``).

- :class:`LeViTStyle`: timm LeViT's token blocks, whose ``LinearNorm`` runs a bias-free Linear on
  ``[B, N, C]`` tokens and a BatchNorm1d over ``x.flatten(0, 1)``, exported as ``MatMul -> Flatten ->
  BatchNormalization -> Reshape``; a conv stem and a BatchNorm1d -> Linear head as LeViT has.
- :func:`quantize_weights`: an ONNX model with every Conv weight stored as int8,
  ``DequantizeLinear(W_q, scale, 0)`` (symmetric, per output channel or per tensor), its BatchNorms kept: the
  QDQ form of a toolchain that quantizes before folding (weights only, so that the original and the folded
  model compute the same values: quantized activations after a fold would round differently).
- :func:`with_identities`: an Identity between every layer and its BatchNorm, as converters other than
  torch's emit them.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from bnfold.architectures import randomize_batchnorm_statistics


class LinearNorm(nn.Module):
    """timm's ``levit.LinearNorm``: ``Linear(bias=False) -> BatchNorm1d`` over the flattened tokens."""

    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        self.linear = nn.Linear(features_in, features_out, bias=False)
        self.bn = nn.BatchNorm1d(features_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Attention(nn.Module):
    """LeViT's attention: qkv and the projection are LinearNorms (attention biases left out)."""

    def __init__(self, dim: int, key_dim: int, heads: int, value_ratio: int = 2):
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_ratio * key_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.value_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * self.value_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, self.heads, -1).split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attention = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attention @ v).transpose(1, 2).reshape(batch, tokens, self.heads * self.value_dim)
        return self.proj(x)


class LeViTStyle(nn.Module):
    """A LeViT-128S-shaped network at a small size: a stride-16 conv stem (Conv->BN->Hardswish x4), residual
    attention and MLP blocks made of LinearNorms, mean-pooled tokens, a BatchNorm1d -> Linear head."""

    def __init__(self, dim: int = 64, blocks: int = 2, heads: int = 4, key_dim: int = 16, classes: int = 10):
        super().__init__()
        widths = [3, dim // 8, dim // 4, dim // 2, dim]
        stem = []
        for cin, cout in zip(widths, widths[1:]):
            stem += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish()]
        self.stem = nn.Sequential(*stem[:-1])  # (LeViT's stem ends on a BatchNorm)
        self.attention = nn.ModuleList(Attention(dim, key_dim, heads) for _ in range(blocks))
        self.mlp = nn.ModuleList(nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim)) for _ in range(blocks))
        self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, classes))
        self.batchnorms = 4 + 4 * blocks + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        for attention, mlp in zip(self.attention, self.mlp):
            x = x + attention(x)
            x = x + mlp(x)
        return self.head(x.mean(dim=1))


LEVIT_INPUT_SHAPE = (3, 64, 64)


def levit_style_model(seed: int = 0) -> LeViTStyle:
    """:class:`LeViTStyle` with seeded weights and trained-looking BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = LeViTStyle()
    randomize_batchnorm_statistics(model, torch.Generator().manual_seed(seed))
    return model.eval()


def quantize_weights(model: onnx.ModelProto, per_channel: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` whose Conv weight initializers are stored as symmetric int8 behind a
    ``DequantizeLinear`` (per output channel, axis 0, or per tensor); needs opset 13 or later."""
    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    graph = quantized.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes = []
    for node in graph.node:
        tensor = initializers.get(node.input[1]) if node.op_type == "Conv" else None
        if tensor is not None:
            weight = numpy_helper.to_array(tensor).astype(np.float64)
            largest = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1) if per_channel else np.abs(weight).max()
            scale = (np.maximum(largest, 1e-12) / 127).astype(np.float32)
            broadcast = scale.reshape((-1,) + (1,) * (weight.ndim - 1)) if per_channel else scale
            integers = np.clip(np.round(weight / broadcast), -127, 127).astype(np.int8)
            zero = np.zeros_like(scale, dtype=np.int8)
            name = tensor.name
            graph.initializer.remove(tensor)
            graph.initializer.extend(
                numpy_helper.from_array(array, f"{name}_{suffix}") for array, suffix in ((integers, "q"), (scale, "scale"), (zero, "zero"))
            )
            attributes = {"axis": 0} if per_channel else {}
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [name], name=f"{name}_dequantize", **attributes))
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return quantized


def with_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with an Identity between every layer and the BatchNormalization reading it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    producers = {output: node for node in copy.graph.node for output in node.output}
    nodes = []
    for node in copy.graph.node:
        if node.op_type == "BatchNormalization" and producers.get(node.input[0]) is not None:
            passed = f"{node.input[0]}_identity"
            nodes.append(helper.make_node("Identity", [node.input[0]], [passed], name=f"{node.name}_identity"))
            node.input[0] = passed
        nodes.append(node)
    copy.graph.ClearField("node")
    copy.graph.node.extend(nodes)
    return copy
