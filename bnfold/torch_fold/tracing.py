"""The model's real data flow as a graph: torch.fx symbolic tracing first, torch.export as the fallback.

Pairs come from this graph, never from module order, so a BatchNorm registered after a conv in
``__init__`` but not called after it in ``forward`` is not a pair.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from bnfold.errors import describe_error
from bnfold.reference import REFERENCE_BATCHNORMS

FOLDABLE_LAYER_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


class ModelNotTraceableError(RuntimeError):
    """Neither torch.fx nor torch.export could turn the model into a graph."""


def has_torch_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs the ``forward`` of the torch class it derives from, unchanged.

    A subclass that only adds attributes or an ``__init__`` computes what the torch layer computes;
    one with its own ``forward`` (a "same"-padding conv, a QAT conv) may compute anything.
    """
    torch_class = next(cls for cls in type(module).__mro__ if cls.__module__.startswith("torch."))
    return type(module).forward is torch_class.forward


def computes_torch_forward(module: nn.Module) -> bool:
    """Whether a call of ``module`` computes what its torch class computes: an unmodified torch forward, or
    bnfold's reference BatchNorm, whose forward tests/test_reference.py holds to torch's."""
    return has_torch_forward(module) or isinstance(module, REFERENCE_BATCHNORMS)


class _UnmodifiedLayersAsLeavesTracer(fx.Tracer):
    """Keeps unmodified torch layers and BatchNorms as single calls and traces through everything else.

    The default tracer keeps every ``torch.nn`` module as a leaf and traces through user classes, so a
    plain ``class MyConv(nn.Conv2d)`` would dissolve into ``F.conv2d``, while a torch subclass with
    its own forward would stay opaque. Here the test is the forward that actually runs.

    Buffers are traced as graph inputs like parameters, so that a scale computed from them in forward
    (FrozenBatchNorm2d's ``weight * (running_var + eps).rsqrt()``) stays traceable to its source instead of
    becoming a constant fx computed while tracing.
    """

    proxy_buffer_attributes = True

    def is_leaf_module(self, module: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(module, (*FOLDABLE_LAYER_TYPES, nn.modules.batchnorm._BatchNorm)):
            return computes_torch_forward(module)
        return super().is_leaf_module(module, module_qualified_name)


@dataclasses.dataclass
class TracedModel:
    """The graphs of one model's forward and how to get from their nodes to the model's tensors.

    fx and torch.export give one graph; TorchDynamo one per stretch of forward between graph breaks.
    ``attribute_paths`` maps each node that stands for a parameter or buffer (fx ``get_attr`` nodes,
    export's lifted placeholders, Dynamo's graph inputs) to its dotted path under ``root``: the GraphModule
    for fx (which shares the model's leaf modules and tensors but has plain ``nn.Module`` s for the modules
    traced through), the model itself otherwise.
    """

    model: nn.Module
    graph_modules: list[fx.GraphModule]
    method: Literal["fx", "export", "dynamo"]
    root: nn.Module
    attribute_paths: dict[fx.Node, str]
    note: str

    @property
    def graph_module(self) -> fx.GraphModule:
        """The one graph of an fx trace, which a graph result is made of."""
        (graph_module,) = self.graph_modules
        return graph_module

    @property
    def nodes(self) -> list[fx.Node]:
        return [node for graph_module in self.graph_modules for node in graph_module.graph.nodes]

    @property
    def graph_rewritable(self) -> bool:
        """Only an fx graph runs as a module of its own; exported and captured graphs are read, not returned."""
        return self.method == "fx"

    @property
    def modules_inlined(self) -> bool:
        """Whether module calls appear as the function calls their forward made (export, Dynamo), with the module
        in each node's ``nn_module_stack``; fx keeps unmodified torch modules as ``call_module`` nodes."""
        return self.method != "fx"

    def tensor_at(self, path: str) -> torch.Tensor | None:
        """The parameter or buffer at ``path``; None for a bias probe (see _probe_absent_biases)."""
        owner_path, _, name = path.rpartition(".")
        return getattr(self.root.get_submodule(owner_path), name)

    def module_stack_top(self, node: fx.Node) -> str | None:
        """The path of the innermost module whose forward produced ``node``, as the tracers record it."""
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else None


def trace_model(model: nn.Module, example_inputs: tuple) -> TracedModel:
    attributes_before = set(vars(model))
    try:
        graph = _UnmodifiedLayersAsLeavesTracer().trace(model)
    # fx raises TraceError, TypeError, RuntimeError, ... depending on what forward does with a proxy.
    except Exception as fx_error:  # noqa: BLE001
        _remove_added_attributes(model, attributes_before)
        return _capture_without_fx(model, example_inputs, fx_error)
    # Named "GraphModule", as fx names it by default: a graph result must not pass for the user's class.
    graph_module = fx.GraphModule(model, graph)
    # fx stores the constants it made while tracing on the model; the GraphModule has its own copies now.
    _remove_added_attributes(model, attributes_before)
    if not _computes_like(model, graph_module, example_inputs):
        # Python that fx evaluates on a proxy (isinstance, torch.jit.isinstance, a branch on a flag) can
        # record a graph the model never runs; its pairs would be a tracing artefact. torch.export runs
        # such Python on fake tensors, as the model does.
        mismatch = RuntimeError("the traced graph computes other outputs than the model on the example inputs")
        return _capture_without_fx(model, example_inputs, mismatch)
    note = "pairs found with torch.fx symbolic tracing"
    attribute_paths = {node: node.target for node in graph.nodes if node.op == "get_attr"}
    return TracedModel(model, [graph_module], "fx", graph_module, attribute_paths, note)


def _capture_without_fx(model: nn.Module, example_inputs: tuple, fx_error: Exception) -> TracedModel:
    """torch.export's graph, else the graphs TorchDynamo captures; the model's own modules carry the folds."""
    probed = _probe_absent_biases(model)
    try:
        try:
            return _export_model(model, example_inputs, fx_error)
        except Exception as export_error:  # noqa: BLE001 - Dynamo captures what export cannot (data-dependent branches)
            try:
                return _capture_with_dynamo(model, example_inputs, fx_error, export_error)
            except Exception as dynamo_error:  # noqa: BLE001 - reported together with the others
                raise ModelNotTraceableError(
                    f"torch.fx could not trace {type(model).__name__} ({describe_error(fx_error)}), torch.export "
                    f"could not export it ({describe_error(export_error)}) and TorchDynamo could not capture it "
                    f"({describe_error(dynamo_error)})"
                ) from dynamo_error
    finally:
        for module in probed:
            module.register_parameter("bias", None)


def _export_model(model: nn.Module, example_inputs: tuple, fx_error: Exception) -> TracedModel:
    exported = torch.export.export(model, example_inputs)
    signature = exported.graph_signature
    lifted = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    graph_module = exported.graph_module
    attribute_paths = {node: lifted[node.name] for node in graph_module.graph.nodes if node.name in lifted}
    note = (
        f"torch.fx could not trace the model ({describe_error(fx_error)}); pairs found with torch.export.export "
        "instead, folded into the model's own modules (function calls outside them are left)"
    )
    return TracedModel(model, [graph_module], "export", model, attribute_paths, note)


def _capture_with_dynamo(
    model: nn.Module, example_inputs: tuple, fx_error: Exception, export_error: Exception
) -> TracedModel:
    """The graphs TorchDynamo captures while the model runs on ``example_inputs``, split at graph breaks
    (a branch on a tensor's value, an unsupported call). A value used across a break is an output of its
    graph, so a pair whose intermediate leaves its graph has another reader and stays, as under fx."""
    graphs: list[tuple[fx.GraphModule, list]] = []

    def keep_graph(graph_module: fx.GraphModule, graph_inputs: list):
        graphs.append((graph_module, graph_inputs))
        return graph_module.forward  # run as captured

    torch._dynamo.reset()  # a fresh capture, not graphs cached from an earlier call
    try:
        # Dynamo inlines module calls: parameters and buffers are graph inputs, each node records its module.
        with torch.no_grad():
            torch.compile(model, backend=keep_graph)(*example_inputs)
    finally:
        torch._dynamo.reset()
    paths_by_tensor = {
        id(tensor): path
        for path, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    }
    paths_by_module = {id(module): path for path, module in model.named_modules(remove_duplicate=False)}
    attribute_paths = {}
    for graph_module, graph_inputs in graphs:
        placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
        for node, value in zip(placeholders, graph_inputs):
            if id(value) in paths_by_tensor:
                attribute_paths[node] = paths_by_tensor[id(value)]
        for node in graph_module.graph.nodes:
            # Dynamo keys each module by str(id(module)); the paths say what the user knows them by.
            stack = node.meta.get("nn_module_stack") or {}
            paths = {key: paths_by_module.get(int(key)) if key.isdigit() else None for key in stack}
            node.meta["nn_module_stack"] = {key: (paths[key], kind) for key, (_, kind) in stack.items() if paths[key] is not None}
    note = (
        f"torch.fx could not trace the model ({describe_error(fx_error)}) nor torch.export export it "
        f"({describe_error(export_error)}); pairs found in the {len(graphs)} graph(s) TorchDynamo captured running "
        "the example inputs (split at graph breaks), folded into the model's own modules. Code paths the example "
        "inputs do not take are not seen: fold with inputs that take the deployed path"
    )
    return TracedModel(model, [graph_module for graph_module, _ in graphs], "dynamo", model, attribute_paths, note)


def _probe_absent_biases(model: nn.Module) -> list[nn.Module]:
    """Give each bias-less layer subclass with its own forward (timm's Conv2dSame) a zero bias while capturing.

    Its forward is free to ignore ``self.bias``; the captured graph shows whether it passes the probe to its
    conv as the bias, and only then does a bias registered on the module reach the folded layer's output.
    The probes are removed after the capture (their graph nodes then stand for an absent bias); zeros leave
    the captured values as they are.
    """
    probed = []
    for module in model.modules():
        if isinstance(module, FOLDABLE_LAYER_TYPES) and module.bias is None and not computes_torch_forward(module):
            channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            module.register_parameter("bias", nn.Parameter(module.weight.new_zeros(channels), requires_grad=False))
            probed.append(module)
    return probed


def _remove_added_attributes(model: nn.Module, attributes_before: set[str]) -> None:
    for name in set(vars(model)) - attributes_before:
        delattr(model, name)


def _computes_like(model: nn.Module, graph_module: fx.GraphModule, example_inputs: tuple) -> bool:
    """Whether the traced graph gives the model's outputs on ``example_inputs`` (the same ops in the same
    order: equal up to the rounding of a kernel that picks another path). The graph runs under ShapeProp,
    which puts each node's shape in its ``tensor_meta`` (which axis a Linear's features are on, where a
    reshape moves the channels) in the same pass."""
    try:
        with torch.no_grad():
            expected, actual = model(*example_inputs), ShapeProp(graph_module).propagate(*example_inputs)
    except Exception:  # noqa: BLE001 - the graph does not even run: it is not the model's
        return False
    expected_leaves, expected_structure = pytree.tree_flatten(expected)
    actual_leaves, actual_structure = pytree.tree_flatten(actual)
    if expected_structure != actual_structure:
        return False
    for want, got in zip(expected_leaves, actual_leaves):
        if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
            return False
        if isinstance(want, torch.Tensor):
            if want.shape != got.shape or want.dtype != got.dtype:
                return False
            finite = want[torch.isfinite(want)] if want.is_floating_point() else want.new_zeros(0)
            scale = finite.abs().max().item() if finite.numel() else 0.0
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-6 + 1e-4 * scale, equal_nan=True):
                return False
    return True
