"""Layer calls and BatchNorm calls read off a traced graph, with the data flow between them.

A call is either a module call (an unmodified torch layer or BatchNorm, known by its path in the
model's module tree) or a function call on parameters and buffers (``F.conv2d(x, self.weight)``,
``F.batch_norm(x, self.running_mean, ...)``, their aten forms in an exported graph, and the functions a
TorchDynamo-captured graph records for module calls).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import itertools
from collections.abc import Collection
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from bnfold.fold_math import LayoutKind, WeightLayout
from bnfold.torch_fold.passthrough import SHAPED_LIKE, passes_values, tensor_shape_and_dtype
from bnfold.torch_fold.tracing import (
    ADD,
    FOLDABLE_LAYER_TYPES,
    SUBTRACT,
    TracedModel,
    absent_biases_probed,
    computes_torch_forward,
    is_op,
    module_input,
    module_stack_paths,
    multiply_add,
    mutates_or_draws,
)

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
# The report's name for a per-channel multiply-add outside any module that could be replaced.
_AFFINE_OP = "x * scale + shift"


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
    pads_zeros: bool  # reads zeros padded around its input, which a BatchNorm before it would not shift
    weight: torch.Tensor | None  # None: computed in forward, not a parameter or buffer
    bias: torch.Tensor | None
    bias_is_attribute: bool  # the bias is absent or a parameter/buffer
    weight_path: str | None
    module_path: str | None  # set when an unmodified torch layer module makes this call

    @property
    def output_channels(self) -> int:
        return self.layout.out_channels(tuple(self.weight.shape))

    def feature_axis(self, rank: int) -> int:
        """The axis of the layer's features in its input or output of rank ``rank``: the last for a Linear; for a
        convolution 1, or 0 on an unbatched input (torch's convolutions also take ``(C, *spatial)``)."""
        if self.layout.kind == "matrix_out_in":
            return rank - 1
        return 1 if rank == self.weight.dim() else 0

    @property
    def input_channels(self) -> int:
        return self.layout.in_channels(tuple(self.weight.shape))


@dataclasses.dataclass(frozen=True, eq=False)
class BatchNormCall:
    """One eval-mode BatchNorm: a module call, ``F.batch_norm`` on parameters and buffers (also inside a
    BatchNorm subclass's own forward), or ``x * scale + shift`` per channel with scale and shift computed from
    parameters and buffers only (FrozenBatchNorm2d)."""

    node: fx.Node  # the normalised value
    input: Any
    name: str  # the module's path, or the node's name for a function call outside any BatchNorm module
    op: str  # the module's class ("BatchNorm2d", "BatchNormAct2d", "FrozenBatchNorm2d"), else "F.batch_norm"
    key: str  # calls with the same key normalise with the same statistics
    # The module the module tree can replace to remove this call: a torch BatchNorm, or a module whose whole
    # forward is this normalisation followed by `kept_children` (timm's BatchNormAct2d: drop, act).
    module_path: str | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    eps: float
    training: bool
    tensors_are_attributes: bool  # every tensor argument is absent or a parameter/buffer
    kept_children: tuple[str, ...] = ()
    per_channel: tuple[torch.Tensor, torch.Tensor] | None = None  # (scale, shift) for x * scale + shift
    call_nodes: int = 1  # graph calls the normalisation takes (the scale's computation included)
    input_reader: fx.Node | None = None  # the node that reads `input`, when not `node` (the multiply)

    @property
    def channels(self) -> int:
        return (self.running_mean if self.per_channel is None else self.per_channel[0]).numel()


@dataclasses.dataclass
class DataFlow:
    """The calls of one traced model and who reads whose output."""

    traced: TracedModel
    layers: dict[fx.Node, LayerCall]
    batchnorms: list[BatchNormCall]
    tensor_uses: collections.Counter[int]  # id(parameter or buffer) -> number of reads in the graph
    call_count: int  # call_module, call_function and call_method nodes
    # Where a BatchNorm call normalises a value computed from parameters alone (weight standardisation):
    # no BatchNorm of data, so neither folded nor left.
    standardisations: list[str] = dataclasses.field(default_factory=list)

    def layer_producing(self, value: Any, folded_away: Collection[fx.Node] = ()) -> LayerCall | None:
        """The layer whose output ``value`` is, directly or through pass-through calls (:mod:`.passthrough`) and
        ``folded_away``, the BatchNorms already folded into the layer before them."""
        while value not in self.layers and (self.passes_through(value) or value in folded_away):
            value = value.args[0]
        return self.layers.get(value) if isinstance(value, fx.Node) else None

    def sole_layer_reading(self, node: fx.Node) -> LayerCall | None:
        """The layer that is the only reader of ``node``'s values (through pass-through calls, each the only
        reader before it), reading it as its data input."""
        readers = value_readers(node)
        while len(readers) == 1 and self.passes_through(readers[0]):
            node, readers = readers[0], value_readers(readers[0])
        if len(readers) != 1:
            return None
        layer = self.layers.get(readers[0])
        return layer if layer is not None and layer.input is node else None

    def passes_through(self, node: Any) -> bool:
        """A call whose output holds its input's values (an ``nn.Identity``, an eval-mode dropout, a reshape or
        permute): no reader that must keep seeing un-normalised values."""
        return passes_values(node, self.traced)

    def uses_of(self, layer: LayerCall) -> int:
        """How many times the graph reads the layer's weight or bias: more than one means a shared layer."""
        return max(self.tensor_uses[id(tensor)] for tensor in (layer.weight, layer.bias) if tensor is not None)

    def batchnorms_by_statistics(self) -> list[list[BatchNormCall]]:
        """The calls in groups that normalise with the same statistics: those with one key (a module's calls), and
        those sharing a running mean or variance tensor (one a training-mode call updates in place for every call
        reading it), in order of their first call."""
        groups: list[list[BatchNormCall]] = []
        group_of: dict[object, list[BatchNormCall]] = {}
        for call in self.batchnorms:
            keys = [call.key, *(id(tensor) for tensor in (call.running_mean, call.running_var) if tensor is not None)]
            joined = list({id(group): group for key in keys if (group := group_of.get(key)) is not None}.values())
            group = joined[0] if joined else []
            if not joined:
                groups.append(group)
            for other in joined[1:]:  # (a call sharing statistics with two groups joins them)
                group.extend(other)
                groups.remove(other)
                group_of.update(dict.fromkeys([key for key, found in group_of.items() if found is other], group))
            group.append(call)
            group_of.update(dict.fromkeys(keys, group))
        position = {id(call): index for index, call in enumerate(self.batchnorms)}
        return [sorted(group, key=lambda call: position[id(call)]) for group in groups]


def read_data_flow(traced: TracedModel) -> DataFlow:
    layers: dict[fx.Node, LayerCall] = {}
    batchnorms: list[BatchNormCall] = []
    # Each node's value when computed from parameters, buffers and literals only, else None: one evaluation
    # per node for every multiply-add looked at (FrozenBatchNorm2d's scale feeds its shift's and its output's).
    constants: dict[fx.Node, Any] = {}
    standardisations = []
    for node in traced.nodes:
        layer = _layer_call(node, traced)
        if layer is not None:
            layers[node] = layer
            continue
        batchnorm = _batchnorm_call(node, traced, constants)
        if batchnorm is None:
            continue
        if batchnorm.per_channel is None and _of_parameters_alone(batchnorm.input, traced, constants):
            # A BatchNorm of parameters alone normalises no data: timm's StdConv2d and transformers' BiT standardise
            # their weight with F.batch_norm(weight, None, None, training=True) at every call.
            standardisations.append(traced.module_stack_top(node) or batchnorm.name)
        else:
            batchnorms.append(batchnorm)
    calls = sum(node.op in ("call_module", "call_function", "call_method") for node in traced.nodes)
    # A module kept as one call for its per-channel affine counts the calls its forward makes, as traced through.
    calls += sum(
        traced.affine_forms[node.target].calls - 1 for node in traced.nodes if node.op == "call_module" and node.target in traced.affine_forms
    )
    flow = DataFlow(traced, layers, [], _count_tensor_uses(traced), calls, standardisations)
    # A per-channel multiply-add counts as a BatchNorm when it is a whole module (FrozenBatchNorm2d) or sits
    # next to a layer; elsewhere (input scaling, layer scale) it is just arithmetic.
    flow.batchnorms = [
        call
        for call in batchnorms
        if call.per_channel is None
        or call.module_path is not None
        or flow.layer_producing(call.input) is not None
        or flow.sole_layer_reading(call.node) is not None
    ]
    return flow


def fold_end_modules(traced: TracedModel) -> set[str]:
    """The paths of the modules that may end up at either end of a fold between modules in this fx graph: layer
    and BatchNorm modules called as such, layer subclasses whose own forward makes a layer function call (timm's
    Conv2dSame), and the modules whose forward makes a BatchNorm function call or the add of a multiply-add
    (FrozenBatchNorm2d). Verification checks each fold on the values around these calls."""
    paths = set()
    for node in traced.nodes:
        if node.op == "call_module":
            module = traced.module(node.target)
            if (
                isinstance(module, _BatchNorm)
                or (isinstance(module, FOLDABLE_LAYER_TYPES) and computes_torch_forward(module))
                or node.target in traced.affine_forms
            ):
                paths.add(node.target)
        elif (node.op == "call_function" and node.target in _BATCHNORM_FUNCTIONS) or is_op(node, ADD | SUBTRACT):
            path = traced.module_stack_top(node)
            if path is not None:
                paths.add(path)
        elif node.op == "call_function" and node.target in _LAYER_FUNCTIONS:
            path = _calling_module(node, traced, FOLDABLE_LAYER_TYPES)  # a layer subclass's own forward
            if path is not None:
                paths.add(path)
    return paths


# Reads of a tensor's metadata, which a fold leaves as they were (same shape, dtype and device): timm's
# BatchNormAct2d asserts `x.ndim == 4` on the conv output, which must not count as a second reader.
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "get_device", "numel", "nelement"})
_METADATA_FUNCTIONS = frozenset({aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.dim.default})


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The readers of ``node`` that see its values, not only its shape, dtype or device."""
    return [reader for reader in node.users if not _reads_only_metadata(reader, node)]


def _reads_only_metadata(reader: fx.Node, node: fx.Node) -> bool:
    if reader.op != "call_module" and reader.target in SHAPED_LIKE and reader.args[1:] == (node,) and reader.args[0] is not node:
        return True  # LeViT's `.reshape_as(x)` reads the shape of x
    if not reader.args or reader.args[0] is not node or node in reader.args[1:] or node in reader.kwargs.values():
        return False
    if reader.op == "call_function" and reader.target is getattr:
        return len(reader.args) == 2 and reader.args[1] in _METADATA_ATTRIBUTES
    if reader.op == "call_method":
        return reader.target in _METADATA_METHODS
    return reader.op == "call_function" and reader.target in _METADATA_FUNCTIONS


def describe_node(node: Any, traced: TracedModel) -> str:
    """A short name for a node in a reason: what the user would recognise in their forward."""
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "call_module":
        return f"`{node.target}` ({type(traced.module(node.target)).__name__})"
    if node.op == "call_function":
        return f"`{getattr(node.target, '__name__', node.target)}`"
    if node.op == "call_method":
        return f"`.{node.target}()`"
    if node.op == "placeholder":
        if traced.method == "dynamo":
            return f"`{node.target}` (a value from before a graph break)"
        return f"the model input `{node.target}`"
    if node.op == "output":
        return "the value kept past a graph break or returned" if traced.method == "dynamo" else "the model output"
    return f"`{node.target}`"


def _count_tensor_uses(traced: TracedModel) -> collections.Counter[int]:
    """Reads per parameter/buffer object, so tied weights count as shared like a module called twice."""
    uses: collections.Counter[int] = collections.Counter()
    for node in traced.nodes:
        if node in traced.attribute_paths:
            tensor = traced.attribute_at(traced.attribute_paths[node])
            if tensor is not None:
                uses[id(tensor)] += len(node.users)
        elif node.op == "call_module":
            module = traced.module(node.target)
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                uses[id(tensor)] += 1
    return uses


def _layer_call(node: fx.Node, traced: TracedModel) -> LayerCall | None:
    if node.op == "call_module":
        module = traced.module(node.target)
        if isinstance(module, FOLDABLE_LAYER_TYPES) and computes_torch_forward(module):
            return _module_layer_call(node, module, node.target)
    elif node.op == "call_function" and node.target in _LAYER_FUNCTIONS:
        return _functional_layer_call(node, _LAYER_FUNCTIONS[node.target], traced)
    return None


def _module_layer_call(node: fx.Node, module: nn.Module, path: str) -> LayerCall:
    if isinstance(module, nn.Linear):
        layout, pads_zeros = WeightLayout("matrix_out_in"), False
    else:
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        layout = WeightLayout("conv_transpose" if transposed else "conv", module.groups)
        # Reflect, replicate and circular padding copy the input's own values, which the BatchNorm has shifted.
        pads_zeros = module.padding_mode == "zeros" and _pads(module.padding, module.kernel_size, module.dilation)
    # A parametrized weight or bias (weight_norm, spectral_norm) is computed anew at each call: a fold written
    # into it would be lost.
    weight_computed, bias_computed = (parametrize.is_parametrized(module, name) for name in ("weight", "bias"))
    return LayerCall(
        node=node,
        input=module_input(node.args, node.kwargs),
        name=path,
        op=type(module).__name__,
        layout=layout,
        pads_zeros=pads_zeros,
        weight=None if weight_computed else module.weight,
        bias=None if bias_computed else module.bias,
        bias_is_attribute=not bias_computed,
        weight_path=f"{path}.weight",
        module_path=path,
    )


def _functional_layer_call(node: fx.Node, function: _LayerFunction, traced: TracedModel) -> LayerCall:
    arguments = _bind(node, function.arguments)
    weight_path = traced.attribute_paths.get(arguments["weight"])
    bias_argument = arguments.get("bias")
    bias_path = traced.attribute_paths.get(bias_argument)
    weight = None if weight_path is None else traced.attribute_at(weight_path)
    pads_zeros = (
        function.kind == "conv"
        and weight is not None
        and _pads(arguments.get("padding", 0), tuple(weight.shape[2:]), arguments.get("dilation", 1))
    )
    module_path = _layer_module_of(node, traced, weight_path, bias_argument, bias_path)
    return LayerCall(
        node=node,
        input=arguments["input"],
        name=_calling_module(node, traced, FOLDABLE_LAYER_TYPES) or weight_path or node.name,
        op=type(traced.module(module_path)).__name__ if module_path else f"F.{function.name}",
        layout=WeightLayout(function.kind, arguments.get("groups", 1)),
        pads_zeros=pads_zeros,
        weight=weight,
        bias=None if bias_path is None else traced.attribute_at(bias_path),
        bias_is_attribute=bias_argument is None or bias_path is not None,
        weight_path=weight_path,
        module_path=module_path,
    )


def _batchnorm_call(node: fx.Node, traced: TracedModel, constants: dict[fx.Node, Any]) -> BatchNormCall | None:
    if node.op == "call_module":
        module = traced.module(node.target)
        if isinstance(module, _BatchNorm):
            return _module_batchnorm_call(node, module, node.target)
        if node.target in traced.affine_forms:
            return _affine_module_call(node, traced)
    elif node.op == "call_function" and node.target in _BATCHNORM_FUNCTIONS:
        return _functional_batchnorm_call(node, _BATCHNORM_FUNCTIONS[node.target], traced)
    elif is_op(node, ADD | SUBTRACT):
        return _affine_call(node, traced, constants)
    return None


def _module_batchnorm_call(node: fx.Node, module: nn.Module, path: str) -> BatchNormCall:
    return BatchNormCall(
        node=node,
        input=module_input(node.args, node.kwargs),
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
    copies = {name: _copy_chain(arguments.get(name), traced) for name in _BATCHNORM_TENSORS}
    paths = {name: traced.attribute_paths.get(chain[-1]) if chain else None for name, chain in copies.items()}
    tensors = {name: None if path is None else traced.attribute_at(path) for name, path in paths.items()}
    owner = _calling_module(node, traced, (_BatchNorm,))
    module_path = _inlined_module_call(node, traced, (_BatchNorm,))
    kept_children: tuple[str, ...] | None = ()
    if owner is not None and module_path is None:  # a BatchNorm subclass with its own forward
        statistics = {value for value in node.all_input_nodes if value in traced.attribute_paths}
        kept_children = module_remainder(traced, owner, arguments["input"], node, {node, *statistics})
        module_path = owner if kept_children is not None else None
    return BatchNormCall(
        node=node,
        input=arguments["input"],
        name=owner or node.name,
        op=type(traced.module(owner)).__name__ if owner else "F.batch_norm",
        key=module_path or node.name,  # (calls sharing a statistics tensor are grouped by it: batchnorms_by_statistics)
        module_path=module_path,
        **tensors,
        eps=float(arguments.get("eps", 1e-5)),
        training=bool(arguments.get("training", False)),
        tensors_are_attributes=all(arguments.get(name) is None or paths[name] is not None for name in paths),
        kept_children=kept_children or (),
        # (its copies go with it, each once: one clone may be passed as both mean and variance)
        call_nodes=1 + len({copy for name, chain in copies.items() if paths[name] is not None for copy in chain[:-1]}),
    )


# Calls whose result is a copy of their one tensor argument, values and dtype unchanged.
_COPY_METHODS = frozenset({"clone", "detach", "contiguous"})
_COPY_FUNCTIONS = frozenset({torch.clone, torch.detach, aten.clone.default, aten.detach.default})


def _copy_chain(value: Any, traced: TracedModel) -> list[fx.Node]:
    """``value``, then each value it is a copy of (``.clone()``: onnx2torch passes each deduplicated initializer
    through an ``OnnxCopyIdentity``), up to the first that is no copy; empty when ``value`` is no node. A copy counts
    only while it is read by the next link alone (anything else may change it in place, ``m.add_(1)``)."""
    chain = []
    while isinstance(value, fx.Node):
        chain.append(value)
        copies = (value.op == "call_method" and value.target in _COPY_METHODS) or (
            value.op == "call_function" and value.target in _COPY_FUNCTIONS
        )
        if not copies or value in traced.attribute_paths or not value.args or len(value.users) != 1:
            break
        value = value.args[0]
    return chain


def _affine_call(node: fx.Node, traced: TracedModel, cache: dict[fx.Node, Any]) -> BatchNormCall | None:
    """``x * scale + shift`` (or ``- shift``, operands in either order) with a per-channel scale and shift
    computed from parameters, buffers and literals only, keeping x's shape and dtype. ``cache`` holds the
    constant values found so far (see :func:`_constant_value`)."""
    found = multiply_add(node)
    if found is None:
        return None
    product, shift_argument, subtracts = found
    shift = _constant_value(shift_argument, traced, cache)
    constants = [(argument, _constant_value(argument, traced, cache)) for argument in product.args]
    variables = [argument for argument, value in constants if value is None]
    if shift is None or len(variables) != 1:
        return None
    (data,) = variables
    scale_argument, scale = next((argument, value) for argument, value in constants if argument is not data)
    per_channel = _per_channel(node, data, tensor_shape_and_dtype(product), scale, shift)
    if per_channel is None:
        return None
    normalisation = {node, product, *_constant_computation((scale_argument, shift_argument), cache)}
    if not any(n in traced.attribute_paths for n in normalisation):
        return None  # literals only: arithmetic, not a BatchNorm
    owner = traced.module_stack_top(node)
    # (a module that normalises, then calls its own children: timm's FrozenBatchNormAct2d, drop then act)
    kept_children = None if owner is None else module_remainder(traced, owner, data, node, normalisation)
    module_path = owner if kept_children is not None else None
    calls = sum(n.op in ("call_function", "call_method") for n in normalisation)
    return _affine_batchnorm(node, data, module_path, traced, per_channel, subtracts, calls, product, kept_children or ())


def _affine_module_call(node: fx.Node, traced: TracedModel) -> BatchNormCall | None:
    """A call of a module kept whole for its per-channel affine forward (see tracing.AffineForm), with the scale
    and shift the graph run computed with its form: a BatchNorm under the conditions of :func:`_affine_call`."""
    computed = traced.affine_values.get(node)
    if computed is None or node.kwargs or len(node.args) != 1:
        return None
    scale, shift, product_meta = computed
    form = traced.affine_forms[node.target]
    data = node.args[0]
    per_channel = _per_channel(node, data, product_meta, scale, shift)
    if per_channel is None:
        return None
    return _affine_batchnorm(node, data, node.target, traced, per_channel, form.subtract, form.calls)


def _per_channel(node: fx.Node, data: Any, product_meta, scale: Any, shift: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``scale`` and ``shift`` as one value per channel of ``data``, when ``node`` (and the product before it,
    ``product_meta``) keeps ``data``'s shape and dtype, and they are not one value for every channel of several
    (timm's LearnableAffineBlock in hgnetv2, ``scale * x + bias`` with one of each: no BatchNorm)."""
    data_meta = tensor_shape_and_dtype(data)
    if data_meta is None or data_meta != tensor_shape_and_dtype(node) or data_meta != product_meta:
        return None
    if len(data_meta[0]) > 1 and data_meta[0][1] > 1 and all(_one_value(value) for value in (scale, shift)):
        return None
    scale, shift = _channel_values(scale, data_meta[0]), _channel_values(shift, data_meta[0])
    return None if scale is None or shift is None else (scale, shift)


def _affine_batchnorm(
    node: fx.Node,
    data: Any,
    module_path: str | None,
    traced: TracedModel,
    per_channel: tuple[torch.Tensor, torch.Tensor],
    subtracts: bool,
    calls: int,
    input_reader: fx.Node | None = None,
    kept_children: tuple[str, ...] = (),
) -> BatchNormCall:
    """The BatchNorm that ``node`` computes as ``data * scale + shift`` (``- shift`` when it ``subtracts``), under
    ``module_path`` when that module can be replaced (by its ``kept_children``) to remove it."""
    scale, shift = per_channel
    return BatchNormCall(
        node=node,
        input=data,
        name=module_path or node.name,
        op=type(traced.module(module_path)).__name__ if module_path else _AFFINE_OP,
        key=module_path or node.name,
        module_path=module_path,
        weight=None,
        bias=None,
        running_mean=None,
        running_var=None,
        eps=0.0,
        training=False,
        tensors_are_attributes=True,
        per_channel=(scale, -shift if subtracts else shift),
        call_nodes=calls,
        input_reader=input_reader,
        kept_children=kept_children,
    )


def module_remainder(
    traced: TracedModel, path: str, data: Any, normalised: fx.Node, normalisation: set[fx.Node]
) -> tuple[str, ...] | None:
    """The child modules that module ``path``'s forward applies after normalising its input, when that is all
    the forward does; None otherwise.

    Proven on the traced graph: ``data`` comes from outside the module; each node made inside the module's
    forward is part of ``normalisation`` (of ``data``, ending at ``normalised``), or reads only a shape, rank or dtype (and checks on it: timm's
    ``_assert(x.ndim == 4)``), or calls one of the module's own children on the previous result alone, one
    after another, the last result leaving the module. Replacing the module by those children is then exact.
    """
    inside_in_order = traced.nodes_inside(normalised.graph, path)
    inside = set(inside_in_order)
    if data in inside:
        return None  # the module computes what it normalises itself
    children: list[str] = []
    applied: set[fx.Node] = set()
    current = normalised
    while any(reader in inside for reader in value_readers(current)):
        call = _child_call(traced, path, current, inside)
        if call is None or call[0] in children:  # (a child applied twice: a replacement holds each child once)
            return None
        name, nodes, current = call
        children.append(name)
        applied |= nodes
    shape_checks: set[fx.Node] = set()
    for node in (node for node in inside_in_order if node not in normalisation and node not in applied):
        reads_metadata = node.op in ("call_function", "call_method") and (
            all(value in shape_checks for value in node.all_input_nodes)
            or (isinstance(node.args[0], fx.Node) and _reads_only_metadata(node, node.args[0]))
        )
        if not reads_metadata or not set(node.users) <= inside:
            return None
        shape_checks.add(node)
    return tuple(children)


def _child_call(
    traced: TracedModel, path: str, value: fx.Node, inside: set[fx.Node]
) -> tuple[str, set[fx.Node], fx.Node] | None:
    """The call of a child of module ``path`` on ``value`` alone, when only that call reads ``value``: the child's
    name, its nodes and its result. fx records the call as one ``call_module`` node, unless the child is a module of
    the user's own (timm's ``GELU``, whose forward fx traces through); torch.export and Dynamo as the calls the
    child's forward made (``bn.drop``: ``aten.dropout``). Those calls must read nothing but ``value`` (timm's
    in-place Swish reads it twice), each other and the child's own parameters, and give one result."""
    readers = list(value_readers(value))
    if len(readers) == 1 and readers[0].op == "call_module":
        (reader,) = readers
        parent, _, name = reader.target.rpartition(".")
        plain_call = parent == path and reader.args == (value,) and not reader.kwargs
        return (name, {reader}, reader) if plain_call else None
    child = next((p for p in module_stack_paths(readers[0]) if p.rpartition(".")[0] == path), None) if readers else None
    if child is None or not _takes_one_argument(traced.module(child)):
        return None
    if traced.method == "fx" and traced.module_calls.get(child) != [True]:
        return None  # (called more than once, or with more than the value: its nodes are not one call on it)
    nodes = inside.intersection(traced.nodes_inside(value.graph, child))
    if not set(readers) <= nodes:
        return None
    child_attributes = {n for n, p in traced.attribute_paths.items() if p.startswith(f"{child}.")}
    if any(not set(node.all_input_nodes) <= nodes | child_attributes | {value} for node in nodes):
        return None
    results = [node for node in nodes if not set(node.users) <= nodes]
    if len(results) != 1:
        return None
    return child.rpartition(".")[2], nodes, results[0]


def _takes_one_argument(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes one argument and no other: a call whose nodes the graph records, not the
    call, may have passed more (``self.act(y, 6.0)``), which replacing the BatchNorm module by ``module`` would drop."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(parameters) == 1 and parameters[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _constant_value(value: Any, traced: TracedModel, cache: dict[fx.Node, Any]) -> Any:
    """The value of ``value`` when it depends only on parameters, buffers and literals (evaluated with the
    model's own ops and dtypes, as its forward computes it), else None. ``cache`` keeps every node looked at:
    the constant ones with their value."""
    if isinstance(value, (list, tuple)):
        items = [_constant_value(item, traced, cache) for item in value]
        constant = all(item is not None or original is None for item, original in zip(items, value))
        return type(value)(items) if constant else None
    if not isinstance(value, fx.Node):
        return value
    if value not in cache:
        cache[value] = _evaluate(value, traced, cache)
    return cache[value]


def _evaluate(node: fx.Node, traced: TracedModel, cache: dict[fx.Node, Any]) -> Any:
    if node in traced.attribute_paths:
        return traced.attribute_at(traced.attribute_paths[node])
    if node.op not in ("call_function", "call_method") or not node.all_input_nodes or mutates_or_draws(node):
        return None
    computed = traced.constant_value(node)
    if computed is not None:  # the graph run's value; its inputs still go in the cache (_constant_computation reads them)
        for used in node.all_input_nodes:
            _constant_value(used, traced, cache)
        return computed
    arguments = [_constant_value(argument, traced, cache) for argument in node.args]
    keywords = {name: _constant_value(argument, traced, cache) for name, argument in node.kwargs.items()}
    given = [*node.args, *node.kwargs.values()]
    if any(value is None and argument is not None for value, argument in zip([*arguments, *keywords.values()], given)):
        return None
    with torch.no_grad():
        if node.op == "call_method":
            return getattr(arguments[0], node.target)(*arguments[1:], **keywords)
        return node.target(*arguments, **keywords)


def _of_parameters_alone(value: Any, traced: TracedModel, cache: dict[fx.Node, Any]) -> bool:
    """Whether ``value`` is computed from parameters (and literals) alone: not from buffers either, which a forward
    may fill with data (``self.bank.copy_(x)``)."""
    if _constant_value(value, traced, cache) is None:
        return False
    read = [node for node in _constant_computation((value,), cache) if node in traced.attribute_paths]
    return bool(read) and all(isinstance(traced.attribute_at(traced.attribute_paths[node]), nn.Parameter) for node in read)


def _constant_computation(values: tuple, cache: dict[fx.Node, Any]) -> set[fx.Node]:
    """The nodes that compute ``values`` from parameters, buffers and literals (constant in ``cache``)."""
    computation: set[fx.Node] = set()
    unvisited = [value for value in values if isinstance(value, fx.Node)]
    while unvisited:
        node = unvisited.pop()
        if node not in computation and cache.get(node) is not None:
            computation.add(node)
            unvisited.extend(node.all_input_nodes)
    return computation


def _one_value(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _channel_values(value: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
    """One value per channel (axis 1 of ``shape``) when ``value`` broadcasts along that axis only, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(float(value), dtype=torch.float64)
    if not isinstance(value, torch.Tensor) or len(shape) < 2 or value.dim() > len(shape):
        return None
    sizes = (1,) * (len(shape) - value.dim()) + tuple(value.shape)
    if any(size != 1 for axis, size in enumerate(sizes) if axis != 1) or sizes[1] not in (1, shape[1]):
        return None
    return value.detach().reshape(-1).expand(shape[1])


def _calling_module(node: fx.Node, traced: TracedModel, types: tuple) -> str | None:
    """The path of the innermost module whose forward made this call, when it is one of ``types``.

    A function call inside a layer or BatchNorm subclass with its own forward is reported under that
    module's name, which is what the user knows it by.
    """
    path = traced.module_stack_top(node)
    return path if path is not None and isinstance(traced.module(path), types) else None


def _layer_module_of(
    node: fx.Node, traced: TracedModel, weight_path: str | None, bias_argument: Any, bias_path: str | None
) -> str | None:
    """The path of the layer module whose forward made this call on its own weight and bias: an unmodified torch
    layer (in an exported or Dynamo-captured graph; fx keeps those as one ``call_module`` node), or a subclass
    whose forward pads and then convolves with ``self.weight`` and ``self.bias`` (timm's Conv2dSame), in any
    graph. Its parameters then hold what this call computes with, so the module tree carries the fold (when
    nothing else reads them, which planning checks). A subclass without a bias gets the folded one registered,
    which its forward must be shown to read: export and Dynamo capture with a probe bias in place, and in an fx
    graph, where the bias is then the literal None, :func:`_passes_own_bias` runs the forward with one."""
    path = _calling_module(node, traced, FOLDABLE_LAYER_TYPES)
    if path is None:
        return None
    layer = traced.module(path)
    if computes_torch_forward(layer):
        return path
    if weight_path != f"{path}.weight":
        return None
    if bias_path == f"{path}.bias":
        return path
    absent_bias_read = (
        not traced.modules_inlined and bias_argument is None and layer.bias is None and _passes_own_bias(node, path, traced)
    )
    return path if absent_bias_read else None


def _passes_own_bias(node: fx.Node, path: str, traced: TracedModel) -> bool:
    """Whether the forward of the bias-less layer subclass at ``path`` (which made the call ``node``) hands
    ``self.bias`` to its layer call once one is registered: a copy of it runs, on zeros shaped as its input
    was in the model's run, with a probe bias in place (:func:`.tracing.absent_biases_probed`), and must make
    one layer call, on ``self.weight`` and the probe. (A copy, its forward alone: the model's own modules and
    hooks see no extra call.)"""
    inside = set(traced.nodes_inside(node.graph, path))
    sources = {value for n in inside for value in n.all_input_nodes if value not in inside and value not in traced.attribute_paths}
    meta = tensor_shape_and_dtype(sources.pop()) if len(sources) == 1 else None
    if meta is None:
        return False
    layer = copy.deepcopy(traced.module(path))
    recorder = _LayerCallRecorder()
    with absent_biases_probed(layer):
        probe = layer.bias
        try:
            with torch.no_grad(), recorder:
                layer.forward(torch.zeros(meta[0], dtype=meta[1], device=layer.weight.device))  # (no hooks)
        except Exception:  # noqa: BLE001 - a forward that needs more than its input's shape: not shown
            return False
    return [(weight is layer.weight, bias is probe) for weight, bias in recorder.calls] == [(True, True)]


class _LayerCallRecorder(TorchFunctionMode):
    """Records the weight and bias of each layer function call made while it is active."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[Any, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LAYER_FUNCTIONS:
            arguments = _bound(args, kwargs, _LAYER_FUNCTIONS[func].arguments)
            self.calls.append((arguments.get("weight"), arguments.get("bias")))
        return func(*args, **kwargs)


def _inlined_module_call(node: fx.Node, traced: TracedModel, types: tuple) -> str | None:
    """In an exported or Dynamo-captured graph, the path of the unmodified torch module whose own forward made
    this call.

    fx keeps such modules as ``call_module`` nodes, so there every function call is a real function call.
    """
    if not traced.modules_inlined:
        return None
    path = _calling_module(node, traced, types)
    return path if path is not None and computes_torch_forward(traced.module(path)) else None


def _bind(node: fx.Node, argument_names: tuple[str, ...]) -> dict[str, Any]:
    return _bound(node.args, node.kwargs, argument_names)


def _bound(args: tuple, kwargs: dict[str, Any], argument_names: tuple[str, ...]) -> dict[str, Any]:
    """A call's arguments by name: the positional ones named in order, then the keywords."""
    return {**dict(zip(argument_names, args)), **kwargs}


def _pads(padding: Any, kernel_size: tuple[int, ...], dilation: Any) -> bool:
    """Whether a convolution reads padding values: any nonzero padding, or "same" with a kernel wider than 1."""
    if isinstance(padding, str):
        dilations = _per_dimension(dilation, len(kernel_size))
        return padding == "same" and any(d * (k - 1) > 0 for k, d in zip(kernel_size, dilations))
    return any(_per_dimension(padding, len(kernel_size)))


def _per_dimension(value: Any, dimensions: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dimensions
