"""Layer calls and BatchNorm calls read off a traced graph, with the data flow between them.

A call is either a module call (an unmodified torch layer or BatchNorm, known by its path in the
model's module tree) or a function call on parameters and buffers (``F.conv2d(x, self.weight)``,
``F.batch_norm(x, self.running_mean, ...)``, and their aten forms in an exported graph).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnfold.fold_math import LayoutKind, WeightLayout
from bnfold.torch_fold.tracing import FOLDABLE_LAYER_TYPES, TracedModel, has_torch_forward

_BatchNorm = nn.modules.batchnorm._BatchNorm
aten = torch.ops.aten

_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_ARGUMENTS = (
    "input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"
)
_LINEAR_ARGUMENTS = ("input", "weight", "bias")
# F.batch_norm and aten.batch_norm take the same values in different orders.
_FUNCTIONAL_BATCHNORM_ARGUMENTS = (
    "input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"
)
_ATEN_BATCHNORM_ARGUMENTS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclasses.dataclass(frozen=True)
class _LayerFunction:
    name: str
    kind: LayoutKind
    arguments: tuple[str, ...]


def _layer_functions() -> dict[Any, _LayerFunction]:
    """torch's functional layers (what fx records) and their aten overloads (what export records)."""
    functions: dict[Any, _LayerFunction] = {}
    for dims in (1, 2, 3):
        conv = _LayerFunction(f"conv{dims}d", "conv", _CONV_ARGUMENTS)
        transpose = _LayerFunction(f"conv_transpose{dims}d", "conv_transpose", _CONV_TRANSPOSE_ARGUMENTS)
        for function in (conv, transpose):
            functions[getattr(torch, function.name)] = function
            aten_packet = getattr(aten, function.name)
            for overload in aten_packet.overloads():
                functions[getattr(aten_packet, overload)] = function
    linear = _LayerFunction("linear", "matrix_out_in", _LINEAR_ARGUMENTS)
    functions.update({F.linear: linear, aten.linear.default: linear})
    return functions


_LAYER_FUNCTIONS = _layer_functions()
_BATCHNORM_FUNCTIONS = {
    F.batch_norm: _FUNCTIONAL_BATCHNORM_ARGUMENTS,
    aten.batch_norm.default: _ATEN_BATCHNORM_ARGUMENTS,
}


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCall:
    """One call of a Conv/ConvTranspose/Linear. Compared by identity: one object per graph node."""

    node: fx.Node  # the call's output value
    input: Any  # its data input, normally an fx.Node
    name: str  # the module's path, or the weight's path for a function call
    op: str  # "Conv2d" for a module call, "F.conv2d" for a function call
    layout: WeightLayout
    pads_input: bool
    weight: torch.Tensor | None  # None: computed in forward, not a parameter or buffer
    bias: torch.Tensor | None
    bias_is_attribute: bool  # the bias is absent or a parameter/buffer
    weight_path: str | None
    module_path: str | None  # set when an unmodified torch layer module makes this call

    @property
    def output_channels(self) -> int:
        return self.layout.out_channels(tuple(self.weight.shape))

    @property
    def input_channels(self) -> int:
        return self.layout.in_channels(tuple(self.weight.shape))


@dataclasses.dataclass(frozen=True, eq=False)
class BatchNormCall:
    """One eval-mode BatchNorm call, as a module or as ``F.batch_norm`` on parameters and buffers."""

    node: fx.Node
    input: Any
    name: str  # the module's path, or the node's name for a function call outside any BatchNorm module
    op: str  # "BatchNorm2d" for a module call, "F.batch_norm" for a function call
    key: str  # calls with the same key normalise with the same statistics
    module_path: str | None  # set when an unmodified torch BatchNorm module makes this call
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    eps: float
    training: bool
    tensors_are_attributes: bool  # every tensor argument is absent or a parameter/buffer

    @property
    def channels(self) -> int:
        return self.running_mean.numel()


@dataclasses.dataclass
class DataFlow:
    """The calls of one traced model and who reads whose output."""

    traced: TracedModel
    layers: dict[fx.Node, LayerCall]
    batchnorms: list[BatchNormCall]
    tensor_uses: collections.Counter[int]  # id(parameter or buffer) -> number of reads in the graph
    call_count: int  # call_module, call_function and call_method nodes

    def layer_producing(self, value: Any) -> LayerCall | None:
        return self.layers.get(value) if isinstance(value, fx.Node) else None

    def sole_layer_reading(self, node: fx.Node) -> LayerCall | None:
        """The layer that is the only reader of ``node``'s values, reading it as its data input."""
        readers = value_readers(node)
        if len(readers) != 1:
            return None
        layer = self.layers.get(readers[0])
        return layer if layer is not None and layer.input is node else None

    def uses_of(self, layer: LayerCall) -> int:
        """How many times the graph reads the layer's weight or bias: more than one means a shared layer."""
        return max(self.tensor_uses[id(tensor)] for tensor in (layer.weight, layer.bias) if tensor is not None)

    def batchnorms_by_statistics(self) -> list[list[BatchNormCall]]:
        groups: dict[str, list[BatchNormCall]] = {}
        for call in self.batchnorms:
            groups.setdefault(call.key, []).append(call)
        return list(groups.values())


def read_data_flow(traced: TracedModel) -> DataFlow:
    layers: dict[fx.Node, LayerCall] = {}
    batchnorms: list[BatchNormCall] = []
    for node in traced.graph_module.graph.nodes:
        layer = _layer_call(node, traced)
        if layer is not None:
            layers[node] = layer
            continue
        batchnorm = _batchnorm_call(node, traced)
        if batchnorm is not None:
            batchnorms.append(batchnorm)
    calls = sum(node.op in ("call_module", "call_function", "call_method") for node in traced.graph_module.graph.nodes)
    return DataFlow(traced, layers, batchnorms, _count_tensor_uses(traced), calls)


# Reads of a tensor's metadata, which a fold leaves as they were (same shape, dtype and device): timm's
# BatchNormAct2d asserts `x.ndim == 4` on the conv output, which must not count as a second reader.
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "get_device", "numel", "nelement"})
_METADATA_FUNCTIONS = frozenset({aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.dim.default})


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The readers of ``node`` that see its values, not only its shape, dtype or device."""
    return [reader for reader in node.users if not _reads_only_metadata(reader, node)]


def _reads_only_metadata(reader: fx.Node, node: fx.Node) -> bool:
    if not reader.args or reader.args[0] is not node or node in reader.args[1:] or node in reader.kwargs.values():
        return False
    if reader.op == "call_function" and reader.target is getattr:
        return len(reader.args) == 2 and reader.args[1] in _METADATA_ATTRIBUTES
    if reader.op == "call_method":
        return reader.target in _METADATA_METHODS
    return reader.op == "call_function" and reader.target in _METADATA_FUNCTIONS


def tensor_rank(node: Any) -> int | None:
    """The rank of a node's value: from ShapeProp's ``tensor_meta`` (fx) or the fake ``val`` (export)."""
    if not isinstance(node, fx.Node):
        return None
    tensor_meta = node.meta.get("tensor_meta")
    if tensor_meta is not None and hasattr(tensor_meta, "shape"):
        return len(tensor_meta.shape)
    value = node.meta.get("val")
    return value.dim() if isinstance(value, torch.Tensor) else None


def describe_node(node: Any, traced: TracedModel) -> str:
    """A short name for a node in a reason: what the user would recognise in their forward."""
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "call_module":
        return f"`{node.target}` ({type(traced.root.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"`{getattr(node.target, '__name__', node.target)}`"
    if node.op == "call_method":
        return f"`.{node.target}()`"
    if node.op == "placeholder":
        return f"the model input `{node.target}`"
    if node.op == "output":
        return "the model output"
    return f"`{node.target}`"


def _count_tensor_uses(traced: TracedModel) -> collections.Counter[int]:
    """Reads per parameter/buffer object, so tied weights count as shared like a module called twice."""
    uses: collections.Counter[int] = collections.Counter()
    for node in traced.graph_module.graph.nodes:
        if node in traced.attribute_paths:
            uses[id(traced.tensor_at(traced.attribute_paths[node]))] += len(node.users)
        elif node.op == "call_module":
            module = traced.root.get_submodule(node.target)
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                uses[id(tensor)] += 1
    return uses


def _layer_call(node: fx.Node, traced: TracedModel) -> LayerCall | None:
    if node.op == "call_module":
        module = traced.root.get_submodule(node.target)
        if isinstance(module, FOLDABLE_LAYER_TYPES) and has_torch_forward(module):
            return _module_layer_call(node, module, node.target)
    elif node.op == "call_function" and node.target in _LAYER_FUNCTIONS:
        return _functional_layer_call(node, _LAYER_FUNCTIONS[node.target], traced)
    return None


def _module_layer_call(node: fx.Node, module: nn.Module, path: str) -> LayerCall:
    if isinstance(module, nn.Linear):
        layout, pads_input = WeightLayout("matrix_out_in"), False
    else:
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        layout = WeightLayout("conv_transpose" if transposed else "conv", module.groups)
        pads_input = _pads(module.padding, module.kernel_size, module.dilation)
    return LayerCall(
        node=node,
        input=node.args[0],
        name=path,
        op=type(module).__name__,
        layout=layout,
        pads_input=pads_input,
        weight=module.weight,
        bias=module.bias,
        bias_is_attribute=True,
        weight_path=f"{path}.weight",
        module_path=path,
    )


def _functional_layer_call(node: fx.Node, function: _LayerFunction, traced: TracedModel) -> LayerCall:
    arguments = _bind(node, function.arguments)
    weight_path = traced.attribute_paths.get(arguments["weight"])
    bias_argument = arguments.get("bias")
    bias_path = traced.attribute_paths.get(bias_argument)
    weight = None if weight_path is None else traced.tensor_at(weight_path)
    pads_input = (
        function.kind == "conv"
        and weight is not None
        and _pads(arguments.get("padding", 0), tuple(weight.shape[2:]), arguments.get("dilation", 1))
    )
    module_path = _exported_module_call(node, traced, FOLDABLE_LAYER_TYPES)
    return LayerCall(
        node=node,
        input=arguments["input"],
        name=_calling_module(node, traced, FOLDABLE_LAYER_TYPES) or weight_path or node.name,
        op=type(traced.root.get_submodule(module_path)).__name__ if module_path else f"F.{function.name}",
        layout=WeightLayout(function.kind, arguments.get("groups", 1)),
        pads_input=pads_input,
        weight=weight,
        bias=None if bias_path is None else traced.tensor_at(bias_path),
        bias_is_attribute=bias_argument is None or bias_path is not None,
        weight_path=weight_path,
        module_path=module_path,
    )


def _batchnorm_call(node: fx.Node, traced: TracedModel) -> BatchNormCall | None:
    if node.op == "call_module":
        module = traced.root.get_submodule(node.target)
        if isinstance(module, _BatchNorm):
            return _module_batchnorm_call(node, module, node.target)
    elif node.op == "call_function" and node.target in _BATCHNORM_FUNCTIONS:
        return _functional_batchnorm_call(node, _BATCHNORM_FUNCTIONS[node.target], traced)
    return None


def _module_batchnorm_call(node: fx.Node, module: nn.Module, path: str) -> BatchNormCall:
    return BatchNormCall(
        node=node,
        input=node.args[0],
        name=path,
        op=type(module).__name__,
        key=path,
        module_path=path,
        **{name: getattr(module, name) for name in _BATCHNORM_TENSORS},
        eps=module.eps,
        training=module.training,
        tensors_are_attributes=True,
    )


def _functional_batchnorm_call(
    node: fx.Node, argument_names: tuple[str, ...], traced: TracedModel
) -> BatchNormCall:
    arguments = _bind(node, argument_names)
    paths = {name: traced.attribute_paths.get(arguments.get(name)) for name in _BATCHNORM_TENSORS}
    tensors = {name: None if path is None else traced.tensor_at(path) for name, path in paths.items()}
    module_path = _exported_module_call(node, traced, (_BatchNorm,))
    return BatchNormCall(
        node=node,
        input=arguments["input"],
        name=_calling_module(node, traced, (_BatchNorm,)) or node.name,
        op="F.batch_norm",
        key=module_path or paths["running_mean"] or node.name,
        module_path=module_path,
        **tensors,
        eps=float(arguments.get("eps", 1e-5)),
        training=bool(arguments.get("training", False)),
        tensors_are_attributes=all(arguments.get(name) is None or paths[name] is not None for name in paths),
    )


def _calling_module(node: fx.Node, traced: TracedModel, types: tuple) -> str | None:
    """The path of the innermost module whose forward made this call, when it is one of ``types``.

    A function call inside a layer or BatchNorm subclass with its own forward is reported under that
    module's name, which is what the user knows it by.
    """
    path = traced.module_stack_top(node)
    return path if path is not None and isinstance(traced.model.get_submodule(path), types) else None


def _exported_module_call(node: fx.Node, traced: TracedModel, types: tuple) -> str | None:
    """In an exported graph, the path of the unmodified torch module whose own forward made this aten call.

    fx keeps such modules as ``call_module`` nodes, so there every function call is a real function call.
    """
    if traced.method != "export":
        return None
    path = _calling_module(node, traced, types)
    return path if path is not None and has_torch_forward(traced.model.get_submodule(path)) else None


def _bind(node: fx.Node, argument_names: tuple[str, ...]) -> dict[str, Any]:
    arguments = dict(zip(argument_names, node.args))
    arguments.update(node.kwargs)
    return arguments


def _pads(padding: Any, kernel_size: tuple[int, ...], dilation: Any) -> bool:
    """Whether a convolution reads padding values: any nonzero padding, or "same" with a kernel wider than 1."""
    if isinstance(padding, str):
        dilations = _per_dimension(dilation, len(kernel_size))
        return padding == "same" and any(d * (k - 1) > 0 for k, d in zip(kernel_size, dilations))
    return any(_per_dimension(padding, len(kernel_size)))


def _per_dimension(value: Any, dimensions: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dimensions
